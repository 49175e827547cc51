//! Compile-fail cases: one per diagnostic of `#[attention_variant]` and `#[derive(AttentionParams)]`,
//! plus one with several errors reported by a single build. `TRYBUILD=overwrite` regenerates the
//! expected `.stderr` files (the toolchain is pinned, so they are stable); read them after.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
