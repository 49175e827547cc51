//! The CPU side of the DSL's numeric rules: the hooks the macro keeps are rewritten so that they
//! compute what the lowered CUDA computes (kernels/cuda/variant/numeric.cuh) and never panic, in
//! this debug build too. (The macro crate's differential test compares the two on generated
//! bodies; this checks the rewriting of a real variant end to end.)

use ferrinfer::prelude::*;

#[derive(AttentionParams)]
pub struct Edgy {
    pub divisor: i32,
    pub shift: u32,
}

#[attention_variant]
impl Edgy {
    fn output(&self, o: f32, i: u32, at: Pos) -> f32 {
        let wrapped = at.kv_pos * 2654435761 + u32::MAX; // wraps
        let shifted = 1u32 << self.shift; // amount modulo 32
        let quotient = i32::MIN / self.divisor; // i32::MIN / -1 == i32::MIN
        let by_zero = (i as i32) / (self.divisor + 1); // x / 0 == 0
        let rest = (i as i32) % (self.divisor + 1); // x % 0 == x
        let negated = -(i32::MIN + at.qo_pos as i32); // wraps
        let magnitude = (i32::MIN + at.qo_pos as i32).abs(); // wraps
        let saturated = (o as i32) as f32; // NaN to 0, else saturating
        if i == 0 {
            wrapped as f32
        } else if i == 1 {
            shifted as f32
        } else if i == 2 {
            quotient as f32
        } else if i == 3 {
            (by_zero + rest) as f32
        } else if i == 4 {
            (negated == magnitude) as i32 as f32
        } else {
            saturated
        }
    }

    fn mask(&self, at: Pos) -> bool {
        // Issue 8: `h` is a u32 (from the assignment), so `h >> 28` is a logical shift of the
        // wrapped product, on the CPU as on the GPU.
        let mut h = 0;
        if at.batch == 0 {
            h = at.kv_pos * 2654435761;
        }
        (h >> 28) < 8
    }
}

#[test]
fn hooks_follow_the_dsl_numeric_rules_on_the_cpu() {
    let v = Edgy {
        divisor: -1,
        shift: 33,
    };
    let at = Pos {
        kv_pos: 3,
        qo_pos: 0,
        ..Pos::default()
    };
    let out = |o: f32, i: u32| v.output(o, i, at);
    assert_eq!(
        out(0.0, 0),
        3u32.wrapping_mul(2654435761).wrapping_sub(1) as f32
    );
    assert_eq!(out(0.0, 1), 2.0);
    assert_eq!(out(0.0, 2), i32::MIN as f32);
    assert_eq!(out(0.0, 3), 3.0); // 3 / 0 + 3 % 0 = 0 + 3
    assert_eq!(out(0.0, 4), 1.0);
    assert_eq!(out(f32::NAN, 9), 0.0);
    assert_eq!(out(1e20, 9), i32::MAX as f32);
    assert_eq!(out(-1e20, 9), i32::MIN as f32);
    let kept = (0..64)
        .filter(|&kv_pos| v.mask(Pos { kv_pos, ..at }))
        .count();
    let expected = (0..64u32)
        .filter(|k| k.wrapping_mul(2654435761) >> 28 < 8)
        .count();
    assert_eq!(kept, expected);
    assert!(0 < kept && kept < 64, "{kept}");
}
