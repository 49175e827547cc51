//! The lowered CUDA of every built-in variant, compared with tests/golden/<snake_name>.cu.
//! `FERRINFER_BLESS=1 cargo test --test golden` rewrites the files; review the diff.

use std::path::PathBuf;

use ferrinfer::Variant;
use ferrinfer::variants::*;

fn snake(name: &str) -> String {
    let mut s = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            s.push('_');
        }
        s.push(c.to_ascii_lowercase());
    }
    s
}

fn check<V: Variant>() {
    let spec = V::SPEC;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{}.cu", snake(spec.name)));
    if std::env::var_os("FERRINFER_BLESS").is_some() {
        std::fs::write(&path, spec.cuda).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (FERRINFER_BLESS=1 writes it)", path.display()));
    assert_eq!(
        spec.cuda,
        expected,
        "{} lowers differently from {}",
        spec.name,
        path.display()
    );
}

#[test]
fn standard() {
    check::<Standard>();
}

#[test]
fn soft_cap() {
    check::<SoftCap>();
}

#[test]
fn alibi() {
    check::<Alibi>();
}

#[test]
fn sliding_window() {
    check::<SlidingWindow>();
}

#[test]
fn custom_mask() {
    check::<CustomMask>();
}

#[test]
fn flash_sigmoid() {
    check::<FlashSigmoid>();
}

#[test]
fn llama_rope() {
    check::<LlamaRope>();
}

#[test]
fn attention_sink() {
    check::<AttentionSink>();
}
