//! The DSL's vocabulary, shared by the checker and the lowering: hook signatures, methods,
//! constants, and the names the generated CUDA reserves.

/// A type in a hook signature.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SigTy {
    F32,
    U32,
    Bool,
    Pos,
}

impl SigTy {
    /// How the type is written in Rust (and must be written in a hook signature).
    pub fn rust(self) -> &'static str {
        match self {
            SigTy::F32 => "f32",
            SigTy::U32 => "u32",
            SigTy::Bool => "bool",
            SigTy::Pos => "Pos",
        }
    }
    /// How a parameter of this type is declared in the lowered CUDA.
    pub fn cuda_param(self) -> &'static str {
        match self {
            SigTy::F32 => "float",
            SigTy::U32 => "unsigned",
            SigTy::Bool => "bool",
            SigTy::Pos => "const fi::Pos&",
        }
    }
}

/// One hook the DSL knows, with its exact signature (after `&self`).
pub struct HookSig {
    pub name: &'static str,
    /// Argument types, and the names the generated trait forwarding uses.
    pub args: &'static [(SigTy, &'static str)],
    pub ret: SigTy,
}

impl HookSig {
    /// `fn name(&self, x: f32, ...) -> f32`, for messages.
    pub fn rust_signature(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|(t, n)| format!(", {n}: {}", t.rust()))
            .collect();
        format!(
            "fn {}(&self{}) -> {}",
            self.name,
            args.concat(),
            self.ret.rust()
        )
    }
}

/// Every hook, in the canonical order (the order of the lowered CUDA and of `Hooks`).
pub const HOOKS: &[HookSig] = &[
    HookSig {
        name: "query",
        args: &[
            (SigTy::F32, "x"),
            (SigTy::F32, "partner"),
            (SigTy::U32, "i"),
            (SigTy::Pos, "at"),
        ],
        ret: SigTy::F32,
    },
    HookSig {
        name: "key",
        args: &[
            (SigTy::F32, "x"),
            (SigTy::F32, "partner"),
            (SigTy::U32, "i"),
            (SigTy::Pos, "at"),
        ],
        ret: SigTy::F32,
    },
    HookSig {
        name: "logits",
        args: &[(SigTy::F32, "s"), (SigTy::Pos, "at")],
        ret: SigTy::F32,
    },
    HookSig {
        name: "mask",
        args: &[(SigTy::Pos, "at")],
        ret: SigTy::Bool,
    },
    HookSig {
        name: "output",
        args: &[(SigTy::F32, "o"), (SigTy::U32, "i"), (SigTy::Pos, "at")],
        ret: SigTy::F32,
    },
    HookSig {
        name: "sink",
        args: &[(SigTy::Pos, "at")],
        ret: SigTy::F32,
    },
];

/// The hook with this name.
pub fn hook(name: &str) -> Option<&'static HookSig> {
    HOOKS.iter().find(|h| h.name == name)
}

/// "query, key, logits, mask, output, sink", for messages.
pub fn hook_list() -> String {
    HOOKS.iter().map(|h| h.name).collect::<Vec<_>>().join(", ")
}

/// The fields of `Pos` (all `u32`).
pub const POS_FIELDS: &[&str] = &[
    "batch", "qo_pos", "kv_pos", "qo_head", "kv_head", "qo_len", "kv_len", "head_dim",
];

/// A method the DSL accepts: Rust name, CUDA function, number of arguments besides the receiver.
pub struct Method {
    pub rust: &'static str,
    pub cuda: &'static str,
    pub args: usize,
}

pub const METHODS: &[Method] = &[
    Method {
        rust: "exp",
        cuda: "expf",
        args: 0,
    },
    Method {
        rust: "exp2",
        cuda: "exp2f",
        args: 0,
    },
    Method {
        rust: "ln",
        cuda: "logf",
        args: 0,
    },
    Method {
        rust: "log2",
        cuda: "log2f",
        args: 0,
    },
    Method {
        rust: "tanh",
        cuda: "tanhf",
        args: 0,
    },
    // ferrinfer::FastMath: the hardware tanh on the GPU, the exact one on the CPU.
    Method {
        rust: "tanh_approx",
        cuda: "fi::tanh_approx",
        args: 0,
    },
    Method {
        rust: "sqrt",
        cuda: "sqrtf",
        args: 0,
    },
    Method {
        rust: "sin",
        cuda: "sinf",
        args: 0,
    },
    Method {
        rust: "cos",
        cuda: "cosf",
        args: 0,
    },
    Method {
        rust: "floor",
        cuda: "floorf",
        args: 0,
    },
    Method {
        rust: "ceil",
        cuda: "ceilf",
        args: 0,
    },
    Method {
        rust: "powf",
        cuda: "powf",
        args: 1,
    },
    // The one fused multiply-add, where a hook asks for it: `a.mul_add(b, c)` rounds once in Rust
    // as `fmaf` does on the GPU (and in libm), so both sides agree; `a * b + c` is never fused.
    Method {
        rust: "mul_add",
        cuda: "fmaf",
        args: 2,
    },
    Method {
        rust: "abs",
        cuda: "fi::abs",
        args: 0,
    },
    Method {
        rust: "min",
        cuda: "fi::min",
        args: 1,
    },
    Method {
        rust: "max",
        cuda: "fi::max",
        args: 1,
    },
    // u32 only; clippy suggests it for `a % b == 0`.
    Method {
        rust: "is_multiple_of",
        cuda: "fi::is_multiple_of",
        args: 1,
    },
];

pub fn method(name: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.rust == name)
}

/// "exp, exp2, ..., max, and len() on parameter arrays", for messages.
pub fn method_list() -> String {
    let names: Vec<&str> = METHODS.iter().map(|m| m.rust).collect();
    format!("{}, and len() on parameter arrays", names.join(", "))
}

/// The scalar types of the DSL (casts, `let` annotations): Rust name and CUDA name.
pub const SCALARS: &[(&str, &str)] = &[
    ("f32", "float"),
    ("i32", "int"),
    ("u32", "unsigned"),
    ("bool", "bool"),
];

/// The types the DSL knows by name, and the paths that may lead to each. A type is written as its
/// name alone or behind one of these prefixes, which may start with `::` (`::core::primitive::f32`).
/// Anything else ending in one of these names is refused with [`spellings`]: a path the macro cannot
/// see through (`crate::Pos`, `my::f32`) may name another type.
const PRIMITIVE: &[&str] = &["core::primitive", "std::primitive"];
/// The facade's paths to `Pos` (its crate root, the prelude, and the module that defines it).
const POS: &[&str] = &["ferrinfer", "ferrinfer::prelude", "ferrinfer::variant"];
/// The facade's paths to `Array`.
const ARRAY: &[&str] = &[
    "ferrinfer",
    "ferrinfer::prelude",
    "ferrinfer::variant::params",
];

/// The accepted prefixes of a named type.
fn prefixes(name: &str) -> Option<&'static [&'static str]> {
    match name {
        "f32" | "i32" | "u32" | "bool" | "usize" => Some(PRIMITIVE),
        "Pos" => Some(POS),
        "Array" => Some(ARRAY),
        _ => None,
    }
}

/// What a type written in a hook or a parameter struct names.
pub enum TypeRef<'a> {
    /// One of the DSL's names (`"f32"`, `"Pos"`, `"Array"`...) by an accepted spelling, with the
    /// generic arguments of its last segment (only `Array` may have any).
    Known(&'static str, &'a syn::PathArguments),
    /// One of the DSL's names behind a path it does not accept: report [`spellings`].
    Misspelled(&'static str),
    /// Anything else.
    Other,
}

/// Read a type: `f32`, `core::primitive::f32`, `::ferrinfer::Pos`, `Array<u32>`...
pub fn type_ref(ty: &syn::Type) -> TypeRef<'_> {
    let p = match ty {
        syn::Type::Group(g) => return type_ref(&g.elem),
        syn::Type::Paren(p) => return type_ref(&p.elem),
        syn::Type::Path(p) if p.qself.is_none() => &p.path,
        _ => return TypeRef::Other,
    };
    let segments: Vec<&syn::PathSegment> = p.segments.iter().collect();
    let Some((last, init)) = segments.split_last() else {
        return TypeRef::Other;
    };
    let Some(name) = ["f32", "i32", "u32", "bool", "usize", "Pos", "Array"]
        .into_iter()
        .find(|n| last.ident == n)
    else {
        return TypeRef::Other;
    };
    let prefix: Vec<String> = init.iter().map(|s| s.ident.to_string()).collect();
    let plain = init.iter().all(|s| s.arguments.is_empty());
    let accepted = match prefix.is_empty() {
        // `::f32` would be a crate named `f32`.
        true => p.leading_colon.is_none(),
        false => prefixes(name).is_some_and(|ok| ok.contains(&prefix.join("::").as_str())),
    };
    if name != "Array" && !last.arguments.is_empty() {
        return TypeRef::Other;
    }
    if accepted && plain {
        TypeRef::Known(name, &last.arguments)
    } else {
        TypeRef::Misspelled(name)
    }
}

/// The message for a known name behind a path the DSL does not accept.
pub fn spellings(name: &str) -> String {
    let ways: Vec<String> = std::iter::once(format!("`{name}`"))
        .chain(
            prefixes(name)
                .unwrap_or_default()
                .iter()
                .map(|p| format!("`{p}::{name}`")),
        )
        .collect();
    format!(
        "unsupported path to `{name}`: write {} (a prefix may start with `::`)",
        ways.join(", ")
    )
}

/// A constant the DSL accepts: its exact CUDA spelling and its Rust type.
pub struct Constant {
    pub cuda: &'static str,
    pub ty: &'static str,
}

/// The constant a path names: `f32::MAX` (also `core::primitive::f32::MAX`, `std::primitive::...`)
/// or `core::f32::consts::PI` (also `std::`), each with or without a leading `::`.
pub fn constant(path: &syn::Path) -> Option<Constant> {
    if path.segments.iter().any(|s| !s.arguments.is_empty()) {
        return None;
    }
    let segs: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let full = matches!(segs.first(), Some(&("core" | "std")));
    if path.leading_colon.is_some() && !full {
        return None;
    }
    let key = match segs.as_slice() {
        [_, "f32", "consts", c] if full => (*c, true),
        [_, "primitive", ty, c] if full => return constant_of(ty, c),
        [ty, c] => return constant_of(ty, c),
        _ => return None,
    };
    constant_cuda(key).map(|cuda| Constant { cuda, ty: "f32" })
}

fn constant_of(ty: &str, c: &str) -> Option<Constant> {
    let ty = ["f32", "i32", "u32"].into_iter().find(|t| *t == ty)?;
    constant_cuda((&format!("{ty}::{c}"), false)).map(|cuda| Constant { cuda, ty })
}

/// The CUDA text of `(name, whether it was under core::f32::consts)`.
fn constant_cuda(key: (&str, bool)) -> Option<&'static str> {
    // The literals are Rust's `{:e}` of each f32 (shortest form that reads back to the same bits).
    let cuda = match key {
        ("PI", true) => "3.1415927f",
        ("E", true) => "2.7182817f",
        ("LN_2", true) => "0.6931472f",
        ("LN_10", true) => "2.3025851f",
        ("LOG2_E", true) => "1.442695f",
        ("SQRT_2", true) => "1.4142135f",
        ("FRAC_1_SQRT_2", true) => "0.70710677f",
        ("f32::INFINITY", false) => "FI_INF",
        ("f32::NEG_INFINITY", false) => "(-FI_INF)",
        ("f32::MAX", false) => "3.4028235e38f",
        ("f32::MIN", false) => "(-3.4028235e38f)",
        ("f32::EPSILON", false) => "1.1920929e-7f",
        ("i32::MAX", false) => "2147483647",
        // -2147483648 would be a long long in C++ (the literal is positive, then negated).
        ("i32::MIN", false) => "(-2147483647 - 1)",
        ("u32::MAX", false) => "4294967295u",
        ("u32::MIN", false) => "0u",
        _ => return None,
    };
    Some(cuda)
}

/// For messages.
pub const CONSTANT_LIST: &str = "f32::{INFINITY, NEG_INFINITY, MAX, MIN, EPSILON}, \
     core::f32::consts::{PI, E, LN_2, LN_10, LOG2_E, SQRT_2, FRAC_1_SQRT_2}, i32::{MIN, MAX}, u32::{MIN, MAX}";

/// Names a Rust identifier cannot keep in the generated CUDA: C++ keywords, the names the lowering
/// itself uses, and the functions it calls.
pub fn is_reserved_in_cuda(name: &str) -> bool {
    const CXX: &[&str] = &[
        "alignas",
        "alignof",
        "and",
        "and_eq",
        "asm",
        "auto",
        "bitand",
        "bitor",
        "bool",
        "case",
        "catch",
        "char",
        "char8_t",
        "char16_t",
        "char32_t",
        "class",
        "co_await",
        "co_return",
        "co_yield",
        "compl",
        "concept",
        "const",
        "const_cast",
        "consteval",
        "constexpr",
        "constinit",
        "continue",
        "decltype",
        "default",
        "delete",
        "do",
        "double",
        "dynamic_cast",
        "else",
        "enum",
        "explicit",
        "export",
        "extern",
        "false",
        "float",
        "for",
        "friend",
        "goto",
        "if",
        "inline",
        "int",
        "long",
        "mutable",
        "namespace",
        "new",
        "noexcept",
        "not",
        "not_eq",
        "nullptr",
        "operator",
        "or",
        "or_eq",
        "private",
        "protected",
        "public",
        "register",
        "reinterpret_cast",
        "requires",
        "return",
        "short",
        "signed",
        "sizeof",
        "static",
        "static_assert",
        "static_cast",
        "struct",
        "switch",
        "template",
        "this",
        "thread_local",
        "throw",
        "true",
        "try",
        "typedef",
        "typeid",
        "typename",
        "union",
        "unsigned",
        "using",
        "virtual",
        "void",
        "volatile",
        "wchar_t",
        "while",
        "xor",
        "xor_eq",
    ];
    const OURS: &[&str] = &[
        "self", "fi", "Params", "Variant", "FI_INF", "fmodf", "powf", "expf", "exp2f", "logf",
        "log2f", "tanhf", "sqrtf", "sinf", "cosf", "floorf", "ceilf",
    ];
    CXX.contains(&name) || OURS.contains(&name)
}
