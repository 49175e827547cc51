//! The numeric semantics of hook code on the CPU: `#[attention_variant]` rewrites the arithmetic
//! operators of the hooks it keeps into calls of these functions, and the lowered CUDA calls their
//! twins in `kernels/cuda/variant/numeric.cuh`, so a hook computes the same bits on both sides and
//! never panics on overflow (in debug builds as in release):
//!
//! | operation | `i32`, `u32` | `f32` |
//! |---|---|---|
//! | `+ - *`, unary `-`, `abs()` | wrap (two's complement) | IEEE, each rounded on its own (no multiply-add contraction) |
//! | `/` | `x / 0 == 0`; `i32::MIN / -1 == i32::MIN` | IEEE |
//! | `%` | `x % 0 == x`; `i32::MIN % -1 == 0` | `fmod` (exact) |
//! | `<< >>` | amount modulo 32 (either integer type); `>>` on `i32` is arithmetic | — |
//!
//! Only what the operator accepts in Rust is implemented (`-` on `u32` stays an error).
//!
//! ```
//! use ferrinfer_runtime::variant::dsl;
//!
//! assert_eq!(dsl::add(u32::MAX, 1), 0);
//! assert_eq!(dsl::div(7i32, 0), 0);
//! assert_eq!(dsl::rem(7i32, 0), 7);
//! assert_eq!(dsl::div(i32::MIN, -1), i32::MIN);
//! assert_eq!(dsl::shl(1u32, 33i32), 2);
//! assert_eq!(dsl::neg(i32::MIN), i32::MIN);
//! ```
//!
//! This file has no imports, so the macro crate's differential test can include it as is.

/// `+ - * / %` on a hook's numeric types, with the rules of the module table.
///
/// ```
/// use ferrinfer_runtime::variant::dsl::Arith;
///
/// assert_eq!(Arith::div(1.0f32, 4.0), 0.25);
/// ```
#[diagnostic::on_unimplemented(
    message = "arithmetic in a hook works on `f32`, `i32` and `u32` of one type, not `{Self}`"
)]
pub trait Arith: Copy {
    /// `a + b`
    fn add(self, b: Self) -> Self;
    /// `a - b`
    fn sub(self, b: Self) -> Self;
    /// `a * b`
    fn mul(self, b: Self) -> Self;
    /// `a / b`
    fn div(self, b: Self) -> Self;
    /// `a % b`
    fn rem(self, b: Self) -> Self;
}

/// Unary `-` and `abs()`: the signed types.
///
/// ```
/// use ferrinfer_runtime::variant::dsl::Signed;
///
/// assert_eq!(Signed::abs(i32::MIN), i32::MIN);
/// ```
#[diagnostic::on_unimplemented(
    message = "`-` and `abs()` in a hook work on `f32` and `i32`, not `{Self}`"
)]
pub trait Signed: Copy {
    /// `-a`
    fn neg(self) -> Self;
    /// `a.abs()`
    fn abs(self) -> Self;
}

/// The integer types of `<<` and `>>` (either side).
///
/// ```
/// use ferrinfer_runtime::variant::dsl::Shift;
///
/// assert_eq!(Shift::shr(-8i32, 1u32), -4);
/// ```
#[diagnostic::on_unimplemented(message = "shifts in a hook work on `i32` and `u32`, not `{Self}`")]
pub trait Shift: Copy {
    /// The amount as a `u32` (bit pattern).
    fn amount(self) -> u32;
    /// `a << s`, `s` modulo 32.
    fn shl(self, s: u32) -> Self;
    /// `a >> s`, `s` modulo 32.
    fn shr(self, s: u32) -> Self;
}

impl Arith for f32 {
    fn add(self, b: f32) -> f32 {
        self + b
    }
    fn sub(self, b: f32) -> f32 {
        self - b
    }
    fn mul(self, b: f32) -> f32 {
        self * b
    }
    fn div(self, b: f32) -> f32 {
        self / b
    }
    fn rem(self, b: f32) -> f32 {
        self % b
    }
}

macro_rules! int_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn add(self, b: $t) -> $t {
                self.wrapping_add(b)
            }
            fn sub(self, b: $t) -> $t {
                self.wrapping_sub(b)
            }
            fn mul(self, b: $t) -> $t {
                self.wrapping_mul(b)
            }
            // x / 0 == 0 and x % 0 == x keep a == (a / b) * b + a % b.
            fn div(self, b: $t) -> $t {
                if b == 0 { 0 } else { self.wrapping_div(b) }
            }
            fn rem(self, b: $t) -> $t {
                if b == 0 { self } else { self.wrapping_rem(b) }
            }
        }
        impl Shift for $t {
            fn amount(self) -> u32 {
                self as u32
            }
            fn shl(self, s: u32) -> $t {
                self.wrapping_shl(s)
            }
            fn shr(self, s: u32) -> $t {
                self.wrapping_shr(s)
            }
        }
    )*};
}
int_arith!(i32, u32);

impl Signed for f32 {
    fn neg(self) -> f32 {
        -self
    }
    fn abs(self) -> f32 {
        self.abs()
    }
}

impl Signed for i32 {
    fn neg(self) -> i32 {
        self.wrapping_neg()
    }
    fn abs(self) -> i32 {
        self.wrapping_abs()
    }
}

/// `a + b` in a hook.
pub fn add<T: Arith>(a: T, b: T) -> T {
    a.add(b)
}
/// `a - b` in a hook.
pub fn sub<T: Arith>(a: T, b: T) -> T {
    a.sub(b)
}
/// `a * b` in a hook.
pub fn mul<T: Arith>(a: T, b: T) -> T {
    a.mul(b)
}
/// `a / b` in a hook.
pub fn div<T: Arith>(a: T, b: T) -> T {
    a.div(b)
}
/// `a % b` in a hook.
pub fn rem<T: Arith>(a: T, b: T) -> T {
    a.rem(b)
}
/// `-a` in a hook.
pub fn neg<T: Signed>(a: T) -> T {
    a.neg()
}
/// `a.abs()` in a hook.
pub fn abs<T: Signed>(a: T) -> T {
    a.abs()
}
/// `a << s` in a hook.
pub fn shl<T: Shift, S: Shift>(a: T, s: S) -> T {
    a.shl(s.amount())
}
/// `a >> s` in a hook.
pub fn shr<T: Shift, S: Shift>(a: T, s: S) -> T {
    a.shr(s.amount())
}
