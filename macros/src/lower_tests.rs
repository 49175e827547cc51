//! Lowering details, on small hook bodies. (Whole variants are covered by tests/golden.)

use crate::{check, errors::Errors, lower, parse};

/// The lowered variant of `impl V { <items> }`; panics on a diagnostic.
fn lower_items(items: &str) -> String {
    let imp: syn::ItemImpl = syn::parse_str(&format!("impl V {{ {items} }}")).unwrap();
    let mut errors = Errors::default();
    let def = parse::variant(Default::default(), &imp, &mut errors);
    let typed = check::variant(&def, &mut errors);
    if let Err(e) = errors.finish() {
        panic!("{items}: {e}");
    }
    lower::variant(&def, &typed)
}

/// The lowered body of the one hook `signature { body }` (one line per statement, indentation
/// removed); the hook's last parameter must be `at: Pos`.
fn hook_body(signature: &str, body: &str) -> String {
    let text = lower_items(&format!("{signature} {{ {body} }}"));
    let start = text.find("const fi::Pos& at) {\n").unwrap() + 21;
    // The hook's own body: a logits hook's split (logits_pre...) follows it.
    let end = start + text[start..].find("\n  }\n").unwrap();
    text[start..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The lowered body of a `logits` hook.
fn logits(body: &str) -> String {
    hook_body("fn logits(&self, s: f32, at: Pos) -> f32", body)
}

/// The lowered expression `e` (the returned value of a one-expression body).
fn expr(e: &str) -> String {
    let body = logits(e);
    body.strip_prefix("return ")
        .and_then(|b| b.strip_suffix(';'))
        .unwrap_or_else(|| panic!("{e} lowered to {body}"))
        .to_string()
}

/// The messages of every diagnostic of `impl V { <items> }`.
fn diagnostics(items: &str) -> Vec<String> {
    let imp: syn::ItemImpl = syn::parse_str(&format!("impl V {{ {items} }}")).unwrap();
    let mut errors = Errors::default();
    let def = parse::variant(Default::default(), &imp, &mut errors);
    check::variant(&def, &mut errors);
    match errors.finish() {
        Ok(()) => Vec::new(),
        Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn shadowing_gets_fresh_names() {
    assert_eq!(
        logits("let x = s; let x = x * 2.0; let x = x + 1.0; x"),
        "const float x = s;\nconst float x_1 = fi::mul(x, 2.0f);\nconst float x_2 = fi::add(x_1, 1.0f);\nreturn x_2;"
    );
    // An argument is a name in the function's scope too.
    assert_eq!(
        logits("let s = s * 2.0; s"),
        "const float s_1 = fi::mul(s, 2.0f);\nreturn s_1;"
    );
    // A name from an inner block is not reused after the block either.
    assert_eq!(
        logits("let mut y = s; if s > 0.0 { let y = 1.0f32; let _ = y; } else { y = 2.0; } y"),
        "float y = s;\nif (s > 0.0f) {\n  const float y_1 = 1.0f;\n} else {\n  y = 2.0f;\n}\nreturn y;"
    );
    // The user's own `x_1` does not collide with a generated one.
    assert_eq!(
        logits("let x_1 = s; let x = s; let x = x + x_1; x"),
        "const float x_1 = s;\nconst float x = s;\nconst float x_2 = fi::add(x, x_1);\nreturn x_2;"
    );
}

#[test]
fn cuda_keywords_and_our_names_are_suffixed() {
    assert_eq!(
        logits("let float = s; let expf = 2.0; float * expf"),
        "const float float_ = s;\nconst float expf_ = 2.0f;\nreturn fi::mul(float_, expf_);"
    );
    let text = lower_items("fn mask(&self, int: Pos) -> bool { int.kv_pos <= int.qo_pos }");
    assert!(
        text.contains("mask(const Params& self, const fi::Pos& int_)"),
        "{text}"
    );
    assert!(
        text.contains("return int_.kv_pos <= int_.qo_pos;"),
        "{text}"
    );
}

#[test]
fn let_forms() {
    assert_eq!(
        logits(
            "let a: f32 = s; let mut b: u32 = 1; let mut c = 0.5; let d: i32; d = 3; b += 1; c *= a; c + (b + d as u32) as f32"
        ),
        "const float a = s;\nunsigned b = 1u;\nfloat c = 0.5f;\nint d;\nd = 3;\nb = fi::add(b, 1u);\nc = fi::mul(c, a);\nreturn fi::add(c, fi::as_f32(fi::add(b, fi::as_u32(d))));"
    );
}

#[test]
fn parentheses_keep_rust_precedence() {
    // Arithmetic is a call of its `fi::` helper: the tree is the Rust one by construction.
    assert_eq!(expr("(s + 1.0) * 2.0"), "fi::mul(fi::add(s, 1.0f), 2.0f)");
    assert_eq!(expr("s + 1.0 * 2.0"), "fi::add(s, fi::mul(1.0f, 2.0f))");
    assert_eq!(expr("s - s - 1.0"), "fi::sub(fi::sub(s, s), 1.0f)");
    // Method calls bind tighter than unary minus in Rust.
    assert_eq!(expr("-s.abs()"), "-fi::abs(s)");
    assert_eq!(expr("(-s).abs()"), "fi::abs(-s)");
    // `- -s` must not become the decrement operator.
    assert_eq!(expr("- -s"), "-(-s)");
    assert_eq!(expr("-(s * 2.0)"), "-fi::mul(s, 2.0f)");
    // `as` binds tighter than `-` (binary) and looser than unary minus.
    assert_eq!(
        expr("-(at.qo_pos as i32) as f32"),
        "fi::as_f32(fi::neg(fi::as_i32(at.qo_pos)))"
    );
    // Shifts are looser than `+` in both languages.
    assert_eq!(
        expr("(at.qo_pos << at.kv_pos + 1) as f32"),
        "fi::as_f32(fi::shl(at.qo_pos, fi::add(at.kv_pos, 1u)))"
    );
}

#[test]
fn comparisons_and_bitwise_operators_are_parenthesised() {
    // Rust: `&` binds tighter than `==`; C++: the other way round.
    let text = lower_items("fn mask(&self, at: Pos) -> bool { at.kv_pos & 1 == 1 }");
    assert!(text.contains("return (at.kv_pos & 1u) == 1u;"), "{text}");
    let text = lower_items(
        "fn mask(&self, at: Pos) -> bool { at.kv_pos < at.qo_pos && at.batch == 0 || !(at.kv_len > 4) }",
    );
    assert!(
        text.contains("return at.kv_pos < at.qo_pos && at.batch == 0u || !(at.kv_len > 4u);"),
        "{text}"
    );
    let text = lower_items("fn mask(&self, at: Pos) -> bool { (at.kv_pos | at.qo_pos) ^ 3 != 0 }");
    assert!(
        text.contains("return ((at.kv_pos | at.qo_pos) ^ 3u) != 0u;"),
        "{text}"
    );
}

#[test]
fn not_and_remainder_follow_the_rust_type() {
    let text =
        lower_items("fn mask(&self, at: Pos) -> bool { let odd = at.kv_pos % 2 == 1; !odd }");
    assert!(
        text.contains("const bool odd = fi::rem(at.kv_pos, 2u) == 1u;"),
        "{text}"
    );
    assert!(text.contains("return !odd;"), "{text}");
    assert_eq!(expr("(!at.kv_pos) as f32"), "fi::as_f32(~at.kv_pos)");
    assert_eq!(expr("s % 2.0"), "fi::rem(s, 2.0f)");
    // A parameter's type nothing decides is the Params struct's: helpers are overloaded on it,
    // and a literal takes it.
    assert_eq!(
        expr("(self.n % 3) as f32"),
        "fi::as_f32(fi::rem(self.n, static_cast<decltype(Params::n)>(3u)))"
    );
    assert_eq!(expr("(!self.n) as f32"), "fi::as_f32(fi::bit_not(self.n))");
    // ... unless something does: here, `s`.
    assert_eq!(expr("s % self.m"), "fi::rem(s, self.m)");
    assert_eq!(
        logits("let mut t = s; t %= 2.0; t"),
        "float t = s;\nt = fi::rem(t, 2.0f);\nreturn t;"
    );
}

#[test]
fn literals() {
    assert_eq!(expr("1.0"), "1.0f");
    assert_eq!(expr("1e-3"), "0.001f");
    assert_eq!(expr("1e-7"), "1e-7f");
    assert_eq!(expr("2f32"), "2.0f");
    assert_eq!(expr("1."), "1.0f");
    assert_eq!(expr("1_000.5_f32"), "1000.5f");
    assert_eq!(
        expr("(3u32 + 1_000) as f32"),
        "fi::as_f32(fi::add(3u, 1000u))"
    );
    assert_eq!(expr("(0xff + 1i32) as f32"), "fi::as_f32(fi::add(255, 1))");
    // A parameter nothing else types: the literal is converted to its type.
    assert_eq!(
        expr("(self.n & 3_000_000_000) as f32"),
        "fi::as_f32(self.n & static_cast<decltype(Params::n)>(3000000000u))"
    );
    // Directly under `as`, an integer literal has the cast's type (as rustc types it).
    assert_eq!(expr("(7 as u32) as f32"), "fi::as_f32(fi::as_u32(7u))");
    assert_eq!(expr("-2147483648 as f32"), "fi::as_f32((-2147483647 - 1))");
    // Unsigned where the other side is known to be: `fi::min(unsigned, int)` would be ambiguous.
    assert_eq!(
        expr("at.kv_pos.min(5) as f32"),
        "fi::as_f32(fi::min(at.kv_pos, 5u))"
    );
    assert_eq!(expr("(true as u32) as f32"), "fi::as_f32(fi::as_u32(true))");
}

#[test]
fn constants_are_exact() {
    assert_eq!(expr("f32::NEG_INFINITY"), "(-FI_INF)");
    assert_eq!(expr("-f32::INFINITY"), "-FI_INF");
    assert_eq!(expr("s * core::f32::consts::PI"), "fi::mul(s, 3.1415927f)");
    assert_eq!(
        expr("s * ::std::f32::consts::LN_2"),
        "fi::mul(s, 0.6931472f)"
    );
    let exact = [
        ("core::f32::consts::PI", std::f32::consts::PI),
        ("core::f32::consts::E", std::f32::consts::E),
        ("core::f32::consts::LN_2", std::f32::consts::LN_2),
        ("core::f32::consts::LN_10", std::f32::consts::LN_10),
        ("core::f32::consts::LOG2_E", std::f32::consts::LOG2_E),
        ("core::f32::consts::SQRT_2", std::f32::consts::SQRT_2),
        (
            "core::f32::consts::FRAC_1_SQRT_2",
            std::f32::consts::FRAC_1_SQRT_2,
        ),
        ("f32::MAX", f32::MAX),
        ("f32::EPSILON", f32::EPSILON),
    ];
    for (path, value) in exact {
        let text = constant(path).unwrap();
        let parsed: f32 = text.trim_end_matches('f').parse().unwrap();
        assert_eq!(parsed.to_bits(), value.to_bits(), "{path}");
    }
    assert_eq!(constant("f32::MIN"), Some("(-3.4028235e38f)"));
    assert_eq!(constant("u32::MAX"), Some("4294967295u"));
}

/// The CUDA text of a constant path.
fn constant(path: &str) -> Option<&'static str> {
    crate::vocab::constant(&syn::parse_str(path).unwrap()).map(|c| c.cuda)
}

#[test]
fn if_expressions() {
    // Simple branches: a conditional expression, also for else-if chains.
    assert_eq!(
        expr("if s > 0.0 { s } else { 0.0 }"),
        "(s > 0.0f ? s : 0.0f)"
    );
    assert_eq!(
        expr("if s > 1.0 { 1.0 } else if s < -1.0 { -1.0 } else { s }"),
        "(s > 1.0f ? 1.0f : (s < -1.0f ? -1.0f : s))"
    );
    assert_eq!(
        logits("let t = 2.0 * if s > 0.0 { s } else { -s }; t"),
        "const float t = fi::mul(2.0f, (s > 0.0f ? s : -s));\nreturn t;"
    );
    // Branches with statements, used as a value: an immediately invoked lambda.
    assert_eq!(
        logits("let t = if s > 0.0 { let u = s * 2.0; u + 1.0 } else { s }; t * t"),
        "const float t = [&]() -> float {\n  if (s > 0.0f) {\n    const float u = fi::mul(s, 2.0f);\n    return fi::add(u, 1.0f);\n  } else {\n    return s;\n  }\n}();\nreturn fi::mul(t, t);"
    );
    // The tail of the function with statements in a branch: an if statement that returns.
    assert_eq!(
        logits("if s > 0.0 { let u = s; u } else if s < 0.0 { return -s; } else { 0.0 }"),
        "if (s > 0.0f) {\n  const float u = s;\n  return u;\n} else if (s < 0.0f) {\n  return -s;\n} else {\n  return 0.0f;\n}"
    );
    // Early return in statement position.
    assert_eq!(
        logits("if s > 10.0 { return 10.0; } s"),
        "if (s > 10.0f) {\n  return 10.0f;\n}\nreturn s;"
    );
}

#[test]
fn parameters_arrays_and_positions() {
    assert_eq!(
        expr("self.a[at.qo_head] * self.b"),
        "fi::mul(fi::index(self.a, self.a_len, at.qo_head), self.b)"
    );
    assert_eq!(expr("self.a.len() as f32"), "fi::as_f32(self.a_len)");
    assert_eq!(
        expr("(at.kv_pos.is_multiple_of(2) as u32) as f32"),
        "fi::as_f32(fi::as_u32(fi::is_multiple_of(at.kv_pos, 2u)))"
    );
    assert_eq!(
        expr("s.max(0.0).powf(2.0).ln()"),
        "logf(powf(fi::max(s, 0.0f), 2.0f))"
    );
}

#[test]
fn hooks_appear_in_canonical_order_with_flags() {
    let text = lower_items(
        "const SOFTMAX: bool = true;
         fn output(&self, o: f32, _i: u32, _: Pos) -> f32 { o }
         fn query(&self, x: f32, _p: f32, _i: u32, _at: Pos) -> f32 { x }",
    );
    let q = text.find("static float query(const Params& self, float x, float _p, unsigned _i, const fi::Pos& _at)");
    let o =
        text.find("static float output(const Params& self, float o, unsigned _i, const fi::Pos&)");
    assert!(q.is_some() && o.is_some() && q < o, "{text}");
    assert!(text.contains("kHasQuery = true;\n  static constexpr bool kHasKey = false;"));
    assert!(text.contains("kHasOutput = true;"));
}

#[test]
fn every_problem_is_reported_at_once() {
    let msgs = diagnostics(
        "fn logits(&self, s: f32, at: Pos) -> f32 {
             let v = [s; 2];
             loop {}
             s.sigmoid() + 1.0f64 + (at.qo_pos as usize) as f32 + s.clamp(0.0, 1.0)
         }
         fn mask(&mut self, at: Pos) -> f32 { 1.0 }
         fn helper(&self) {}",
    );
    assert_eq!(msgs.len(), 9, "{msgs:#?}");
    for expected in [
        "unknown hook `helper`",
        "array literals",
        "loops are not supported",
        "unknown method `sigmoid`",
        "f64 literals",
        "index arrays with u32 or i32",
        "unknown method `clamp`",
        "not `&mut self`",
        "`mask` returns `bool`",
    ] {
        assert!(
            msgs.iter().any(|m| m.contains(expected)),
            "{expected}: {msgs:#?}"
        );
    }
}

#[test]
fn statement_only_forms_are_rejected_as_values() {
    let msgs = diagnostics(
        "fn logits(&self, s: f32, _at: Pos) -> f32 { let mut t = s; let u = { t = 2.0; t }; u + (t += 1.0) }",
    );
    assert!(
        msgs.iter().any(|m| m.contains("a block used as a value")),
        "{msgs:#?}"
    );
    let msgs =
        diagnostics("fn logits(&self, s: f32, _at: Pos) -> f32 { let t = if s > 0.0 { s }; t }");
    assert!(
        msgs.iter().any(|m| m.contains("needs an `else`")),
        "{msgs:#?}"
    );
    let msgs = diagnostics("fn logits(&self, s: f32, at: Pos) -> f32 { self.x = s; s }");
    assert!(
        msgs.iter().any(|m| m.contains("parameters are read-only")),
        "{msgs:#?}"
    );
}

#[test]
fn qualified_paths_lower_like_the_short_ones() {
    let short = lower_items(
        "const SOFTMAX: bool = true;
         fn logits(&self, s: f32, at: Pos) -> f32 {
             let x: f32 = s * core::f32::consts::PI;
             let n: u32 = at.qo_pos;
             let k = at.kv_pos as i32 - i32::MAX;
             if x > f32::MAX { f32::INFINITY } else { x + n as f32 + k as f32 + u32::MAX as f32 }
         }
         fn mask(&self, at: Pos) -> bool { let b: bool = at.kv_pos <= at.qo_pos; b }",
    );
    let spellings = [
        (
            "core::primitive::",
            "ferrinfer::",
            "core::f32::consts::",
            "core::primitive::",
        ),
        (
            "std::primitive::",
            "::ferrinfer::",
            "::std::f32::consts::",
            "std::primitive::",
        ),
        (
            "::core::primitive::",
            "ferrinfer::prelude::",
            "::core::f32::consts::",
            "::core::primitive::",
        ),
        (
            "::std::primitive::",
            "::ferrinfer::variant::",
            "std::f32::consts::",
            "::std::primitive::",
        ),
    ];
    for (ty, pos, consts, konst) in spellings {
        let long = lower_items(&format!(
            "const SOFTMAX: {ty}bool = true;
             fn logits(self: &Self, s: {ty}f32, at: {pos}Pos) -> {ty}f32 {{
                 let x: {ty}f32 = s * {consts}PI;
                 let n: {ty}u32 = at.qo_pos;
                 let k = at.kv_pos as {ty}i32 - {konst}i32::MAX;
                 if x > {konst}f32::MAX {{ {konst}f32::INFINITY }} else {{ x + n as {ty}f32 + k as {ty}f32 + {konst}u32::MAX as {ty}f32 }}
             }}
             fn mask(&self, at: {pos}Pos) -> {ty}bool {{ let b: {ty}bool = at.kv_pos <= at.qo_pos; b }}"
        ));
        assert_eq!(long, short, "{ty} {pos} {consts} {konst}");
    }
}

#[test]
fn other_paths_to_the_dsl_types_are_refused_with_the_accepted_ones() {
    let msgs = diagnostics(
        "const SOFTMAX: my::bool = true;
         fn logits(&self, s: crate::f32, at: ferrinfer_runtime::Pos) -> ::f32 {
             let x: ::std::f32 = s;
             x as foo::u32 as core::primitive::usize as f32
         }",
    );
    assert_eq!(
        msgs,
        [
            "unsupported path to `bool`: write `bool`, `core::primitive::bool`, `std::primitive::bool` (a prefix may start with `::`)",
            "unsupported path to `f32`: write `f32`, `core::primitive::f32`, `std::primitive::f32` (a prefix may start with `::`)",
            "unsupported path to `Pos`: write `Pos`, `ferrinfer::Pos`, `ferrinfer::prelude::Pos`, `ferrinfer::variant::Pos` (a prefix may start with `::`)",
            "unsupported path to `f32`: write `f32`, `core::primitive::f32`, `std::primitive::f32` (a prefix may start with `::`)",
            "unsupported path to `f32`: write `f32`, `core::primitive::f32`, `std::primitive::f32` (a prefix may start with `::`)",
            // The outer cast is checked first.
            "casts to `usize` are not supported: index arrays with u32 or i32 (`self.a[at.qo_head]`)",
            "unsupported path to `u32`: write `u32`, `core::primitive::u32`, `std::primitive::u32` (a prefix may start with `::`)",
        ]
    );
    // Constants: the legacy module constants and other crates' paths are not the DSL's.
    for path in [
        "core::f32::MAX",
        "::f32::MAX",
        "my::f32::MAX",
        "core::primitive::f64::MAX",
        "crate::f32::consts::PI",
    ] {
        assert_eq!(constant(path), None, "{path}");
    }
}

#[test]
fn one_mistake_gives_one_error() {
    // A refused pattern binds its names as errors: they are not unknown further down.
    let msgs = diagnostics(
        "fn logits(&self, s: f32, at: Pos) -> f32 {
             let [a, b] = self.pair;
             let P { x, y: ref z } = self.p;
             if let Some(c) = self.o { return c; }
             let Some(d) = self.o else { return 0.0; };
             let f = |v: f32| v * 2.0;
             let g = f(s);
             let h: f64 = s;
             h.qo_pos + a[0] + b.len() as f32 + x + z + d + g + at.kv_pos as f32
         }",
    );
    assert_eq!(
        msgs,
        [
            "a `let` binds one name (`let x = ...;` or `let mut x = ...;`); patterns are not supported",
            "a `let` binds one name (`let x = ...;` or `let mut x = ...;`); patterns are not supported",
            "`if let` / `let` in an expression is not supported in a hook: use a plain `if`",
            "`let ... else` is not supported in a hook",
            "closures are not supported in a hook: compute the value inline",
            "a local's type is f32, i32, u32 or bool",
        ]
    );
    // Arguments refused by pattern, type or count; a name reported unknown once.
    let msgs = diagnostics(
        "fn logits(&self, (s, t): (f32, f32), mut at: Pos) -> f32 { at = at; s + t + at.qo_pos as f32 }
         fn mask(&self, at: f32) -> bool { at.kv_pos == 0 }
         fn output(&self, at: Pos) -> f32 { at.qo_pos as f32 }
         fn sink(&self, _at: Pos) -> f32 { let x = nope; nope = 1.0; x + nope }",
    );
    assert_eq!(
        msgs,
        [
            "wrong argument type: expected `f32`; the signature is `fn logits(&self, s: f32, at: Pos) -> f32`",
            "a hook argument is a plain name (or `_`)",
            "hook arguments are read-only: copy into a local (`let mut x = x;`)",
            "wrong argument type: expected `Pos`; the signature is `fn mask(&self, at: Pos) -> bool`",
            "wrong number of arguments: `output` takes 3 after `&self`, found 1; the signature is `fn output(&self, o: f32, i: u32, at: Pos) -> f32`",
            &format!(
                "unknown name `nope`: a hook sees its arguments, its locals, `self.<field>` and the constants {}",
                crate::vocab::CONSTANT_LIST
            ),
        ]
    );
}

/// The lowered body of a `mask` hook.
fn mask(body: &str) -> String {
    hook_body("fn mask(&self, at: Pos) -> bool", body)
}

// Issue 8: each of these lowered to CUDA that computed something else than the Rust, or did not
// compile (an ambiguous overload, found only by NVRTC on the GPU).

#[test]
fn a_literal_takes_the_type_of_a_later_assignment() {
    // Was `auto h = 0;` (an int): `(h >> 28) < 8` kept every key on the GPU, none on the CPU.
    assert_eq!(
        mask("let mut h = 0; h = at.kv_pos * 2654435761; (h >> 28) < 8"),
        "unsigned h = 0u;\nh = fi::mul(at.kv_pos, 2654435761u);\nreturn fi::shr(h, 28) < 8u;"
    );
    let text = lower_items(
        "fn mask(&self, at: Pos) -> bool { let mut h = 0; if at.batch > 0 { h = at.kv_pos; } h > 3 }",
    );
    assert!(text.contains("unsigned h = 0u;"), "{text}");
}

#[test]
fn min_max_and_if_have_one_type_on_both_sides() {
    // Was `fi::min(self.limit, 4096)`: ambiguous between the unsigned and int overloads.
    assert_eq!(
        mask("at.kv_pos < self.limit.min(4096)"),
        "return at.kv_pos < fi::min(self.limit, 4096u);"
    );
    // A parameter nothing else types keeps its own type; the literal is converted to it.
    assert_eq!(
        mask("self.limit.min(4096) > 0"),
        "return fi::min(self.limit, static_cast<decltype(Params::limit)>(4096u)) > static_cast<decltype(Params::limit)>(0u);"
    );
    // Was `const auto x = 3;` then `fi::min(x, at.qo_pos)`: int against unsigned.
    assert_eq!(
        mask("let x = 3; at.kv_pos < x.min(at.qo_pos)"),
        "const unsigned x = 3u;\nreturn at.kv_pos < fi::min(x, at.qo_pos);"
    );
    // Was `(c ? at.kv_pos : 0)`: a conditional of unsigned and int.
    assert_eq!(
        mask("let w = if at.batch > 0 { 0 } else { at.kv_pos }; w > 1"),
        "const unsigned w = (at.batch > 0u ? 0u : at.kv_pos);\nreturn w > 1u;"
    );
}

#[test]
fn integer_arithmetic_and_floats_follow_the_documented_rules() {
    // Wrapping, masked shifts, defined division: the fi:: helpers of numeric.cuh.
    assert_eq!(
        expr("((at.kv_pos as i32 + 1) / (at.qo_pos as i32 % 7) << 33) as f32"),
        "fi::as_f32(fi::shl(fi::div(fi::add(fi::as_i32(at.kv_pos), 1), fi::rem(fi::as_i32(at.qo_pos), 7)), 33))"
    );
    // No multiply-add contraction: `s * a + b` is two rounded operations.
    assert_eq!(expr("s * 0.5 + 1.0"), "fi::add(fi::mul(s, 0.5f), 1.0f)");
    // `-` on i32 wraps (i32::MIN stays i32::MIN); a negative literal stays a literal.
    assert_eq!(
        expr("(-(at.kv_pos as i32) + -2147483648) as f32"),
        "fi::as_f32(fi::add(fi::neg(fi::as_i32(at.kv_pos)), (-2147483647 - 1)))"
    );
    // `&` on bools stays a bool in C++.
    assert_eq!(
        mask("let b = (at.kv_pos > 1) & (at.qo_pos > 2); !b"),
        "const bool b = static_cast<bool>((at.kv_pos > 1u) & (at.qo_pos > 2u));\nreturn !b;"
    );
}

#[test]
fn types_the_lowering_cannot_know_are_errors_with_a_span() {
    let msgs = diagnostics(
        "fn logits(&self, s: f32, at: Pos) -> f32 { let t = 0.5; s * (t as i32) as f32 }",
    );
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert!(msgs[0].contains("Rust would make it an f64"), "{msgs:#?}");
    // A mismatch is rustc's to report (one mistake, one error); the CUDA of such a variant, never
    // compiled since rustc refuses it, would not compile either.
    let src = "fn logits(&self, s: f32, at: Pos) -> f32 { let x = s + at.kv_pos; let y = x * 2.0; y + x }";
    assert_eq!(diagnostics(src), Vec::<String>::new());
    assert!(
        lower_items(src).contains("static_assert(false, \"#[attention_variant] could not type this variant (hook 'logits': 'f32' against 'u32'); please report it\");"),
        "{}",
        lower_items(src)
    );
    // `at` is only usable through its fields.
    let msgs = diagnostics("fn logits(&self, s: f32, at: Pos) -> f32 { let p = at; s }");
    assert_eq!(
        msgs,
        ["`at` is only usable as `at.<field>` (e.g. `at.kv_pos`)"]
    );
}

#[test]
fn only_mul_add_fuses() {
    // `a * b + c` stays two roundings; `mul_add` is the one fused form, on both sides.
    assert_eq!(expr("s * 2.0 + 1.0"), "fi::add(fi::mul(s, 2.0f), 1.0f)");
    assert_eq!(expr("s.mul_add(2.0, 1.0)"), "fmaf(s, 2.0f, 1.0f)");
}

#[test]
fn logits_are_split_around_their_scales() {
    let text = lower_items(
        "fn logits(&self, s: f32, at: Pos) -> f32 {
             let _ = at;
             self.cap * (s * (1.0 / self.cap)).tanh_approx()
         }",
    );
    let after =
        |name: &str| text[text.find(name).unwrap_or_else(|| panic!("{text}"))..].to_string();
    assert!(
        after("static float logits_pre(const Params& self) {\n")
            .contains("{\n    return fi::div(1.0f, self.cap);\n  }"),
        "{text}"
    );
    assert!(
        after("static float logits_post(const Params& self) {\n")
            .contains("{\n    return self.cap;\n  }"),
        "{text}"
    );
    assert!(
        after("static float logits_core(const Params& self, float s, const fi::Pos& at) {\n")
            .contains("{\n    return fi::tanh_approx(s);\n  }"),
        "{text}"
    );
    // tanh bounds the core: the kernels may then drop the running row maximum.
    assert!(
        text.contains("static constexpr float kLogitsCoreBound = 1e0f;"),
        "{text}"
    );
    // No split: the scales are 1 and the core is the hook.
    let text = lower_items("fn logits(&self, s: f32, at: Pos) -> f32 { s + at.kv_pos as f32 }");
    assert!(!text.contains("kLogitsCoreBound"), "{text}");
    assert!(text.contains("static float logits_pre(const Params& self) {\n    return 1.0f;\n  }"));
    assert!(text.contains("static float logits_post(const Params& self) {\n    return 1.0f;\n  }"));
    assert!(text.contains(
        "static float logits_core(const Params& self, float s, const fi::Pos& at) {\n    \
         return logits(self, s, at);\n  }"
    ));
}

/// The mask over a tile (tile.rs): intervals for integers, three values for booleans, exact
/// values for parameter-only parts, both ways of an early `return`, checked array reads; no
/// `mask_tile` for a body with an assignment, or whose verdict is "some" on every tile.
#[test]
fn mask_tile_follows_the_body() {
    let text = lower_items(
        "fn mask(&self, at: Pos) -> bool {
             let q = at.qo_pos as i32 + at.kv_len as i32 - at.qo_len as i32;
             let k = at.kv_pos as i32;
             k > q || q - k < self.window as i32 && at.kv_pos % 2 == 0
         }",
    );
    let tile = &text[text
        .find("static fi::Tri mask_tile(const Params& self, const fi::PosRange& at) {\n")
        .unwrap_or_else(|| panic!("{text}"))..];
    assert!(
        tile.contains(
            "    const fi::Iv r1 = fi::iv_sub<int>(fi::iv_add<int>(fi::iv_cast<int>(at.qo_pos), \
             fi::iv_cast<int>(at.kv_len)), fi::iv_cast<int>(at.qo_len));\n    \
             const fi::Iv r2 = fi::iv_cast<int>(at.kv_pos);\n    \
             return fi::tri_or(fi::iv_gt(r2, r1), fi::tri_and(fi::iv_lt(fi::iv_sub<int>(r1, r2), \
             fi::iv_point(fi::as_i32(self.window))), fi::kSome));\n  }"
        ),
        "{tile}"
    );
    let tile_of = |body: &str| {
        let text = lower_items(&format!("fn mask(&self, at: Pos) -> bool {{ {body} }}"));
        text.find("mask_tile(").map(|at| text[at..].to_string())
    };
    // An early return: both ways joined by the condition.
    let tile = tile_of(
        "if at.kv_pos < self.sink { return true; } \
         let k = at.kv_pos as i32; at.qo_pos as i32 - k < self.window",
    )
    .unwrap();
    assert!(
        tile.contains(
            "return fi::tri_if(fi::iv_lt(at.kv_pos, fi::iv_point(self.sink)), fi::kAll, "
        ),
        "{tile}"
    );
    // An element read: its index checked (a possible trap makes the verdict "some").
    let tile = tile_of("at.kv_pos < self.limits[at.batch]").unwrap();
    assert!(
        tile.contains(
            "    bool ok = true;\n    const fi::Iv c0 = fi::iv_index(self.limits_len, at.batch, ok);\n    \
             return ok ? fi::iv_lt(at.kv_pos, fi::iv_element(self.limits, c0)) : fi::kSome;"
        ),
        "{tile}"
    );
    for body in [
        "let mut k = at.kv_pos; k = k + 1; k > at.qo_pos",
        "let k: u32; k = at.kv_pos; k > at.qo_pos",
        // "Some" on every tile.
        "let bit = at.qo_pos * at.kv_len + at.kv_pos; (self.bits[bit >> 5] >> (bit & 31)) & 1 == 1",
    ] {
        assert!(tile_of(body).is_none(), "{body}");
    }
}
