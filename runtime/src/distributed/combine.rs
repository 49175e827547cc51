//! Combining the ranks' partial attention states: the (output, LSE) of every rank, gathered
//! rank-major as an all-gather leaves them, merged with the cascade merge
//! ([`crate::ops::cascade::merge_states`]): the same code on the CPU (simulated ranks) and on a
//! GPU (after NCCL's all-gather).

use crate::device::backend::Backend;
use crate::device::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::cascade::{self, State, StateMut, StateShape};

/// Merge `world` states gathered rank-major — `gathered.v` `[world, rows, num_heads, head_dim]`,
/// `gathered.s` `[world, rows, num_heads]` — into `out` (`shape`: `[rows, num_heads, head_dim]`
/// and `[rows, num_heads]`). A rank whose LSE is `-inf` for a (row, head) held none of its keys
/// and contributes nothing. Asynchronous on a GPU; one launch of the merge kernel.
///
/// Errors: a buffer whose length does not match (named in the message), a buffer of another
/// backend, `world` of 0, or more than 2^32 - 1 (row, head) pairs.
///
/// ```
/// use ferrinfer_runtime::distributed::merge_ranks;
/// use ferrinfer_runtime::ops::cascade::{State, StateMut, StateShape};
/// use ferrinfer_runtime::{Backend, View, ViewMut, prelude::bf16};
/// // 2 ranks, 1 row, 1 head, head dim 2; rank 1 held no key of the row.
/// let shape = StateShape::new(1, 1, 2)?;
/// let v = [1.0f32, 2.0, 9.0, 9.0].map(bf16::from_f32);
/// let s = [0.5f32, f32::NEG_INFINITY];
/// let (mut o, mut lse) = ([bf16::ZERO; 2], [0.0f32; 1]);
/// merge_ranks(
///     &Backend::Cpu,
///     shape,
///     2,
///     State::new(&View::host(&v), &View::host(&s)),
///     StateMut::new(&mut ViewMut::host(&mut o), &mut ViewMut::host(&mut lse)),
/// )?;
/// assert_eq!((o.map(f32::from), lse), ([1.0, 2.0], [0.5]));
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
pub fn merge_ranks<T: Element>(
    backend: &Backend,
    shape: StateShape,
    world: u32,
    gathered: State<'_, T>,
    out: StateMut<'_, T>,
) -> Result<()> {
    shape.validate()?;
    if world == 0 {
        return Err(Error::invalid(
            "merge_ranks: world must be at least 1, got 0",
        ));
    }
    let w = world as usize;
    let lens = [
        ("gathered.v", gathered.v.len(), shape.v_len().checked_mul(w)),
        ("gathered.s", gathered.s.len(), shape.s_len().checked_mul(w)),
        ("out.v", out.v.len(), Some(shape.v_len())),
        ("out.s", out.s.len(), Some(shape.s_len())),
    ];
    for (name, got, want) in lens {
        if want != Some(got) {
            return Err(Error::invalid(format!(
                "merge_ranks: {name} has {got} elements; {world} ranks of [rows={}, num_heads={}, \
                 head_dim={}] need {}",
                shape.rows,
                shape.num_heads,
                shape.head_dim,
                want.map_or("more than fit in memory".to_string(), |w| w.to_string())
            )));
        }
    }
    if shape.rows == 0 {
        return Ok(());
    }
    // Rank-major is the merge's stacked layout `[rows', states, heads', head_dim]` with one row
    // whose heads are all (row, head) pairs: state k then starts k * rows * num_heads heads in.
    let pairs =
        u32::try_from(u64::from(shape.rows) * u64::from(shape.num_heads)).map_err(|_| {
            Error::unsupported(format!(
                "merge_ranks: {} rows x {} heads exceeds 2^32 - 1 (row, head) pairs",
                shape.rows, shape.num_heads
            ))
        })?;
    let fused = StateShape::new(1, pairs, shape.head_dim)?;
    cascade::merge_states(backend, fused, world, gathered, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::view::{View, ViewMut};
    use half::bf16;

    #[test]
    fn rank_major_merge_matches_the_f64_merge() {
        // 3 ranks, 2 rows, 2 heads, head dim 3, LSEs spread and one (row, head) empty on rank 1.
        let shape = StateShape::new(2, 2, 3).unwrap();
        let world = 3usize;
        let v: Vec<bf16> = (0..world * shape.v_len())
            .map(|i| bf16::from_f32((i as f32 * 0.37).sin()))
            .collect();
        let mut s: Vec<f32> = (0..world * shape.s_len())
            .map(|i| (i as f32 * 1.3).cos())
            .collect();
        s[shape.s_len() + 1] = f32::NEG_INFINITY;
        let (mut o, mut lse) = (vec![bf16::ZERO; shape.v_len()], vec![0f32; shape.s_len()]);
        merge_ranks(
            &Backend::Cpu,
            shape,
            world as u32,
            State::new(&View::host(&v), &View::host(&s)),
            StateMut::new(&mut ViewMut::host(&mut o), &mut ViewMut::host(&mut lse)),
        )
        .unwrap();
        // The oracle in the merge's own row-major layout [rows, states, heads, dim].
        let (h, d) = (shape.num_heads as usize, shape.head_dim as usize);
        let mut sv = Vec::new();
        let mut ss = Vec::new();
        for r in 0..shape.rows as usize {
            for k in 0..world {
                let at = k * shape.s_len() + r * h;
                ss.extend(s[at..at + h].iter().map(|&x| f64::from(x)));
                sv.extend(
                    v[at * d..(at + h) * d]
                        .iter()
                        .map(|&x| f64::from(x.to_f32())),
                );
            }
        }
        let (wo, wl) = cascade::merge_states_f64(shape, world as u32, &sv, &ss).unwrap();
        for (g, w) in o.iter().zip(&wo) {
            assert!((f64::from(g.to_f32()) - w).abs() < 1e-2, "{g} vs {w}");
        }
        for (g, w) in lse.iter().zip(&wl) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn lengths_are_checked() {
        let shape = StateShape::new(2, 2, 3).unwrap();
        let v = vec![bf16::ZERO; shape.v_len()];
        let s = vec![0f32; shape.s_len()];
        let (mut o, mut lse) = (vec![bf16::ZERO; shape.v_len()], vec![0f32; shape.s_len()]);
        let e = merge_ranks(
            &Backend::Cpu,
            shape,
            2,
            State::new(&View::host(&v), &View::host(&s)),
            StateMut::new(&mut ViewMut::host(&mut o), &mut ViewMut::host(&mut lse)),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("gathered.v has 12 elements; 2 ranks"), "{e}");
    }
}
