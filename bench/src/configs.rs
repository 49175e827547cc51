//! The standard configurations of DESIGN.md ("Benchmarks"), with the same keys, shapes, byte and
//! FLOP formulas as `../shared/bench/flashinfer_anchor.py`, so the two JSON files line up.

use ferrinfer::indptr;
use ferrinfer::prelude::*;
use ferrinfer_testkit::Rng;

/// Query heads.
pub const H: u32 = 32;
/// KV heads (GQA 4).
pub const HKV: u32 = 8;
/// Head dimension.
pub const D: u32 = 128;
/// Bytes of one bf16 element.
pub const ELT: u64 = 2;
/// Seed of the page shuffle: the same page table on every run.
pub const PAGE_SEED: u64 = 0;

/// How the KV cache of a configuration is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Contiguous K and V (FlashInfer's single prefill); one request of a ragged cache here.
    Single,
    /// One contiguous run of tokens per request.
    Ragged,
    /// Pages of this many tokens, handed out in a shuffled order.
    Paged(u32),
}

/// Which wrapper runs a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `BatchDecode`: one query row per request; reports GB/s.
    Decode,
    /// `BatchPrefill`: reports TFLOP/s.
    Prefill,
}

/// One standard configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The anchor's key, e.g. `decode_b64_l4096_p16`.
    pub key: &'static str,
    /// Decode or prefill.
    pub kind: Kind,
    /// How the KV cache is stored.
    pub storage: Storage,
    /// Query rows per request (1 for decode).
    pub qo_lens: Vec<u32>,
    /// KV tokens per request.
    pub kv_lens: Vec<u32>,
    /// Bottom-right aligned causal mask.
    pub causal: bool,
    /// Logits soft cap (the `SoftCap` variant), or 0 for `Standard`.
    pub soft_cap: f32,
    /// Keys a query sees (the `SlidingWindow` variant, a mask hook), or 0 for `Standard`.
    pub window: u32,
    /// The rotary base of the `LlamaRope` variant (query and key hooks), or 0 for `Standard`.
    pub rope_theta: f32,
    /// Query heads and KV heads: (`H`, `HKV`) but for the head-grouping decode keys.
    pub heads: (u32, u32),
    /// Head dimension: `D` but for the head-dim rows of [`ours_only`].
    pub head_dim: u32,
}

/// Every 16th request is long (8192 tokens), the rest short (512): a skewed batch.
pub fn skew_lengths(batch: usize) -> Vec<u32> {
    (0..batch)
        .map(|i| if i % 16 == 0 { 8192 } else { 512 })
        .collect()
}

fn decode(key: &'static str, kv_lens: Vec<u32>, page: u32, soft_cap: f32) -> Config {
    Config {
        key,
        kind: Kind::Decode,
        storage: Storage::Paged(page),
        qo_lens: vec![1; kv_lens.len()],
        kv_lens,
        causal: false,
        soft_cap,
        window: 0,
        rope_theta: 0.0,
        heads: (H, HKV),
        head_dim: D,
    }
}

/// 64 requests x 4096 tokens, page 16, with `hq` query heads over `hkv` KV heads (the anchor's
/// `DECODE_GROUPS`).
fn decode_group(key: &'static str, hq: u32, hkv: u32) -> Config {
    Config {
        heads: (hq, hkv),
        ..decode(key, vec![4096; 64], 16, 0.0)
    }
}

fn prefill(
    key: &'static str,
    storage: Storage,
    (batch, qo, kv): (usize, u32, u32),
    causal: bool,
    soft_cap: f32,
) -> Config {
    Config {
        key,
        kind: Kind::Prefill,
        storage,
        qo_lens: vec![qo; batch],
        kv_lens: vec![kv; batch],
        causal,
        soft_cap,
        window: 0,
        rope_theta: 0.0,
        heads: (H, HKV),
        head_dim: D,
    }
}

/// The standard configurations, in the anchor's order.
pub fn standard() -> Vec<Config> {
    use Storage::{Paged, Ragged, Single};
    vec![
        decode("decode_b64_l4096_p16", vec![4096; 64], 16, 0.0),
        decode("decode_b16_l32768_p16", vec![32768; 16], 16, 0.0),
        decode("decode_b128_l1024_p1", vec![1024; 128], 1, 0.0),
        decode("decode_b256_l2048_p16", vec![2048; 256], 16, 0.0),
        decode("decode_skew_b64_p16", skew_lengths(64), 16, 0.0),
        decode("decode_b64_l4096_p16_softcap30", vec![4096; 64], 16, 30.0),
        decode_group("decode_mha_b64_l4096_p16", 32, 32),
        decode_group("decode_gqa2_b64_l4096_p16", 32, 16),
        decode_group("decode_gqa8_b64_l4096_p16", 64, 8),
        prefill(
            "prefill_single_s8192_causal",
            Single,
            (1, 8192, 8192),
            true,
            0.0,
        ),
        prefill(
            "prefill_single_s8192_full",
            Single,
            (1, 8192, 8192),
            false,
            0.0,
        ),
        prefill(
            "prefill_single_s8192_causal_softcap30",
            Single,
            (1, 8192, 8192),
            true,
            30.0,
        ),
        prefill(
            "prefill_ragged_b16_l1024_causal",
            Ragged,
            (16, 1024, 1024),
            true,
            0.0,
        ),
        prefill(
            "prefill_paged_b16_l1024_p16_causal",
            Paged(16),
            (16, 1024, 1024),
            true,
            0.0,
        ),
        prefill(
            "prefill_paged_b4_l8192_p16_causal",
            Paged(16),
            (4, 8192, 8192),
            true,
            0.0,
        ),
        prefill(
            "append_paged_b16_q256_kv4096_p16_causal",
            Paged(16),
            (16, 256, 4096),
            true,
            0.0,
        ),
    ]
}

/// Rows the anchor has no key for (issue 9): the long causal prompt under a mask hook whose
/// window covers it (`SlidingWindow` of 8192: the visible pairs, and so the FLOPs, of
/// `prefill_single_s8192_causal`, which it should stay within 15% of), at head dims 64 and
/// 256, over pages of 64 and 128 keys, ragged requests of 2048 and 4096 keys (and 1024 without
/// the causal mask), and the long causal prompt under query and key hooks (`LlamaRope`).
pub fn ours_only() -> Vec<Config> {
    let causal = || prefill("", Storage::Single, (1, 8192, 8192), true, 0.0);
    vec![
        Config {
            key: "prefill_single_s8192_causal_window8192",
            window: 8192,
            ..causal()
        },
        Config {
            key: "prefill_single_s8192_causal_hd64",
            head_dim: 64,
            ..causal()
        },
        Config {
            key: "prefill_single_s8192_causal_hd256",
            head_dim: 256,
            ..causal()
        },
        // Pages FA3 copies by TMA (64 and more keys), beside the anchor's pages of 16 (cp.async).
        prefill(
            "prefill_paged_b16_l1024_p64_causal",
            Storage::Paged(64),
            (16, 1024, 1024),
            true,
            0.0,
        ),
        prefill(
            "prefill_paged_b16_l1024_p128_causal",
            Storage::Paged(128),
            (16, 1024, 1024),
            true,
            0.0,
        ),
        // Ragged requests between the anchor's 1024 and 8192 keys, where FA3's two K/V tiles at
        // head dim 128 trade places (`KvTile`; the rule is `FA3_LONG_TILE_MIN_KV`).
        prefill(
            "prefill_ragged_b8_l2048_causal",
            Storage::Ragged,
            (8, 2048, 2048),
            true,
            0.0,
        ),
        prefill(
            "prefill_ragged_b4_l4096_causal",
            Storage::Ragged,
            (4, 4096, 4096),
            true,
            0.0,
        ),
        prefill(
            "prefill_ragged_b16_l1024_full",
            Storage::Ragged,
            (16, 1024, 1024),
            false,
            0.0,
        ),
        // Query and key hooks: every K tile rotated in the kernel, once a query tile.
        Config {
            key: "prefill_single_s8192_causal_rope",
            rope_theta: 10_000.0,
            ..causal()
        },
    ]
}

/// Bytes a decode step moves with `(query heads, KV heads)`: K and V of every token, plus q and o.
pub fn decode_bytes(kv_lens: &[u32], (hq, hk): (u32, u32)) -> u64 {
    let tokens: u64 = kv_lens.iter().map(|&l| u64::from(l)).sum();
    let (h, hkv, d) = (u64::from(hq), u64::from(hk), u64::from(D));
    tokens * hkv * d * 2 * ELT + 2 * kv_lens.len() as u64 * h * d * ELT
}

/// FLOPs of a prefill at head dim `head_dim`: `4 * H * head_dim` per visible (q, k) pair;
/// causal is bottom-right aligned.
pub fn prefill_flops(qo_lens: &[u32], kv_lens: &[u32], causal: bool, head_dim: u32) -> u64 {
    let pairs: u64 = qo_lens
        .iter()
        .zip(kv_lens)
        .map(|(&q, &k)| {
            let (q, k) = (u64::from(q), u64::from(k));
            q * k
                - if causal {
                    q * (q.saturating_sub(1)) / 2
                } else {
                    0
                }
        })
        .sum();
    4 * u64::from(H) * u64::from(head_dim) * pairs
}

impl Config {
    /// The head shape: `H` query over `HKV` KV heads of `D`, or the grouping or head dim of its
    /// key.
    pub fn heads(&self) -> ferrinfer::Result<Heads> {
        Heads::new(self.heads.0, self.heads.1, self.head_dim)
    }

    /// `qo_indptr` of the batch.
    pub fn qo_indptr(&self) -> Vec<i32> {
        indptr(&self.qo_lens)
    }

    /// The KV index: ragged, or paged with pages shuffled by [`PAGE_SEED`].
    pub fn kv_index(&self) -> ferrinfer::Result<KvIndex> {
        let page = match self.storage {
            Storage::Single | Storage::Ragged => {
                return KvIndex::ragged(&indptr(&self.kv_lens), KvLayout::Nhd);
            }
            Storage::Paged(p) => p,
        };
        let total: u32 = self.kv_lens.iter().map(|l| l.div_ceil(page)).sum();
        let mut pages: Vec<i32> = (0..total as i32).collect();
        Rng::new(PAGE_SEED).shuffle(&mut pages);
        KvIndex::paged_from_lens(page, &self.kv_lens, &pages, total, KvLayout::Nhd)
    }

    /// The figure of merit and its unit for a run of `ms` milliseconds.
    pub fn metric(&self, ms: f64) -> (f64, &'static str) {
        match self.kind {
            Kind::Decode => (
                decode_bytes(&self.kv_lens, self.heads) as f64 / ms / 1e6,
                "GB/s",
            ),
            Kind::Prefill => (
                prefill_flops(&self.qo_lens, &self.kv_lens, self.causal, self.head_dim) as f64
                    / ms
                    / 1e9,
                "TFLOP/s",
            ),
        }
    }

    /// Bytes of one input set (q, k, v and o) on the device.
    pub fn input_bytes(&self) -> ferrinfer::Result<u64> {
        let heads = self.heads()?;
        let kv = self.kv_index()?.buffer_len(&heads) as u64;
        let q: u64 = self.qo_lens.iter().map(|&l| u64::from(l)).sum::<u64>()
            * u64::from(self.heads.0)
            * u64::from(self.head_dim);
        Ok((2 * q + 2 * kv) * ELT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_key(key: &str) -> Config {
        standard().into_iter().find(|c| c.key == key).unwrap()
    }

    #[test]
    fn the_keys_are_the_anchors() {
        let keys: Vec<&str> = standard().iter().map(|c| c.key).collect();
        assert_eq!(
            keys,
            [
                "decode_b64_l4096_p16",
                "decode_b16_l32768_p16",
                "decode_b128_l1024_p1",
                "decode_b256_l2048_p16",
                "decode_skew_b64_p16",
                "decode_b64_l4096_p16_softcap30",
                "decode_mha_b64_l4096_p16",
                "decode_gqa2_b64_l4096_p16",
                "decode_gqa8_b64_l4096_p16",
                "prefill_single_s8192_causal",
                "prefill_single_s8192_full",
                "prefill_single_s8192_causal_softcap30",
                "prefill_ragged_b16_l1024_causal",
                "prefill_paged_b16_l1024_p16_causal",
                "prefill_paged_b4_l8192_p16_causal",
                "append_paged_b16_q256_kv4096_p16_causal",
            ]
        );
    }

    #[test]
    fn shapes_match_the_keys() {
        let c = by_key("decode_b128_l1024_p1");
        assert_eq!((c.kv_lens.len(), c.kv_lens[0]), (128, 1024));
        assert_eq!(c.storage, Storage::Paged(1));
        assert_eq!(c.qo_lens, vec![1; 128]);
        let c = by_key("append_paged_b16_q256_kv4096_p16_causal");
        assert_eq!(
            (c.qo_lens[0], c.kv_lens[0], c.qo_lens.len()),
            (256, 4096, 16)
        );
        assert!(c.causal);
        assert!(!by_key("prefill_single_s8192_full").causal);
        assert_eq!(by_key("decode_b64_l4096_p16_softcap30").soft_cap, 30.0);
        assert_eq!(
            by_key("prefill_single_s8192_causal_softcap30").soft_cap,
            30.0
        );
        assert_eq!(
            by_key("prefill_ragged_b16_l1024_causal").storage,
            Storage::Ragged
        );
    }

    #[test]
    fn skew_has_four_long_requests() {
        let l = skew_lengths(64);
        assert_eq!(l.iter().filter(|&&x| x == 8192).count(), 4);
        assert_eq!(
            l.iter().map(|&x| u64::from(x)).sum::<u64>(),
            4 * 8192 + 60 * 512
        );
        assert_eq!((l[0], l[1], l[16]), (8192, 512, 8192));
    }

    #[test]
    fn decode_bytes_by_hand() {
        // 64 * 4096 tokens * 8 heads * 128 * (K, V) * 2 bytes, plus q and o: 2 * 64 * 32 * 128 * 2.
        assert_eq!(
            decode_bytes(&[4096; 64], (H, HKV)),
            1_073_741_824 + 1_048_576
        );
        assert_eq!(decode_bytes(&[1], (H, HKV)), 4096 + 16_384);
        assert_eq!(
            decode_bytes(&skew_lengths(64), (H, HKV)),
            63_488 * 4096 + 64 * 16_384
        );
    }

    #[test]
    fn prefill_flops_by_hand() {
        // 4 * 32 * 128 = 16384 FLOPs per pair.
        assert_eq!(prefill_flops(&[8192], &[8192], false, D), 1 << 40);
        // 8192^2 - 8192 * 8191 / 2 = 33_558_528 pairs.
        assert_eq!(
            prefill_flops(&[8192], &[8192], true, D),
            16_384 * 33_558_528
        );
        // 256 rows on 4096 keys: 256 * 4096 - 256 * 255 / 2 = 1_015_936 pairs per request.
        assert_eq!(
            prefill_flops(&[256; 16], &[4096; 16], true, D),
            16_384 * 16 * 1_015_936
        );
        assert_eq!(prefill_flops(&[1], &[5], true, D), 16_384 * 5);
        // Head dim 64 halves the FLOPs of a pair.
        assert_eq!(prefill_flops(&[1], &[5], true, 64), 8_192 * 5);
    }

    #[test]
    fn the_rows_only_ours_runs() {
        let extra = ours_only();
        let keys: Vec<&str> = extra.iter().map(|c| c.key).collect();
        assert_eq!(
            keys,
            [
                "prefill_single_s8192_causal_window8192",
                "prefill_single_s8192_causal_hd64",
                "prefill_single_s8192_causal_hd256",
                "prefill_paged_b16_l1024_p64_causal",
                "prefill_paged_b16_l1024_p128_causal",
                "prefill_ragged_b8_l2048_causal",
                "prefill_ragged_b4_l4096_causal",
                "prefill_ragged_b16_l1024_full",
                "prefill_single_s8192_causal_rope",
            ]
        );
        assert!(standard().iter().all(|c| !keys.contains(&c.key)));
        let causal = by_key("prefill_single_s8192_causal");
        let window = &extra[0];
        // The window covers the prompt: the same work as the causal row, under a mask hook.
        assert_eq!((window.window, window.soft_cap), (8192, 0.0));
        assert_eq!(window.metric(1.0), causal.metric(1.0));
        assert_eq!(
            (
                window.qo_lens.clone(),
                window.kv_lens.clone(),
                window.causal
            ),
            (causal.qo_lens.clone(), causal.kv_lens.clone(), true)
        );
        for (c, hd) in extra[1..3].iter().zip([64, 256]) {
            assert_eq!((c.head_dim, c.heads().unwrap().head_dim()), (hd, hd));
            assert_eq!(c.window, 0);
            assert_eq!(
                c.metric(1.0).0 * 128.0,
                causal.metric(1.0).0 * f64::from(hd)
            );
        }
        // The paged rows are the p16 row's work over larger pages.
        let p16 = by_key("prefill_paged_b16_l1024_p16_causal");
        for (c, page) in extra[3..].iter().zip([64, 128]) {
            assert!(matches!(c.storage, Storage::Paged(p) if p == page));
            assert_eq!(c.metric(1.0), p16.metric(1.0));
        }
        let rope = extra.last().unwrap();
        assert_eq!(
            (rope.rope_theta, rope.metric(1.0)),
            (10_000.0, causal.metric(1.0))
        );
        assert!(
            standard()
                .iter()
                .all(|c| c.head_dim == D && c.window == 0 && c.rope_theta == 0.0)
        );
    }

    #[test]
    fn metric_units() {
        let c = by_key("decode_b64_l4096_p16");
        let (v, u) = c.metric(1.0);
        assert_eq!(u, "GB/s");
        assert!((v - 1_074.790_4).abs() < 1e-9);
        let c = by_key("prefill_single_s8192_full");
        let (v, u) = c.metric(2.0);
        assert_eq!(u, "TFLOP/s");
        assert!((v - (1u64 << 40) as f64 / 2e9).abs() < 1e-9);
    }

    #[test]
    fn paged_index_is_shuffled_and_complete() {
        let c = by_key("decode_skew_b64_p16");
        let kv = c.kv_index().unwrap();
        let total = 4 * 512 + 60 * 32;
        assert_eq!(kv.capacity(), total);
        for (b, &l) in c.kv_lens.iter().enumerate() {
            assert_eq!(kv.kv_len(b), l);
        }
        let mut pages = kv.indices().to_vec();
        assert_ne!(pages, (0..total as i32).collect::<Vec<_>>());
        pages.sort_unstable();
        assert_eq!(pages, (0..total as i32).collect::<Vec<_>>());
        // The same page table every run.
        assert_eq!(kv, c.kv_index().unwrap());
    }

    #[test]
    fn head_groupings_match_the_anchor() {
        for (key, heads) in [
            ("decode_mha_b64_l4096_p16", (32, 32)),
            ("decode_gqa2_b64_l4096_p16", (32, 16)),
            ("decode_gqa8_b64_l4096_p16", (64, 8)),
            ("decode_b64_l4096_p16", (32, 8)),
        ] {
            let c = by_key(key);
            assert_eq!(
                (c.heads, c.kv_lens.len(), c.kind),
                (heads, 64, Kind::Decode)
            );
            let h = c.heads().unwrap();
            assert_eq!((h.num_qo_heads(), h.num_kv_heads()), heads);
        }
        // MHA reads four times the K/V of GQA 4: 64 x 4096 tokens x 32 heads x 128 x 2 x 2 B.
        let mha = by_key("decode_mha_b64_l4096_p16");
        assert_eq!(
            decode_bytes(&mha.kv_lens, mha.heads),
            4 * 1_073_741_824 + 1_048_576
        );
    }

    #[test]
    fn odd_lengths_fill_a_partial_last_page() {
        let c = Config {
            kv_lens: vec![17, 16, 1],
            qo_lens: vec![1; 3],
            ..by_key("decode_b64_l4096_p16")
        };
        let kv = c.kv_index().unwrap();
        assert_eq!(kv.last_len(), vec![1, 16, 1]);
        assert_eq!(kv.indptr(), vec![0, 2, 3, 4]);
    }

    #[test]
    fn ragged_and_single_batches() {
        let c = by_key("prefill_ragged_b16_l1024_causal");
        let kv = c.kv_index().unwrap();
        assert_eq!((kv.page_size(), kv.capacity()), (None, 16 * 1024));
        assert_eq!(c.qo_indptr()[16], 16 * 1024);
        let s = by_key("prefill_single_s8192_causal");
        assert_eq!(s.kv_index().unwrap().kv_len(0), 8192);
        assert_eq!(s.qo_indptr(), vec![0, 8192]);
    }

    #[test]
    fn input_bytes_count_q_o_k_v() {
        // q and o: 8192 * 32 * 128; k and v: 8192 * 8 * 128; 2 bytes each.
        let s = by_key("prefill_single_s8192_causal");
        assert_eq!(
            s.input_bytes().unwrap(),
            (2 * 33_554_432 + 2 * 8_388_608) * 2
        );
    }
}
