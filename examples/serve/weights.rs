//! The model's weights on the host: random from a seed, or read from (and written to) a
//! safetensors file with Hugging Face Llama names. Row-major `[out, in]` as `nn.Linear` keeps them.

use std::path::Path;

use ferrinfer::prelude::bf16;
use ferrinfer_testkit::Rng;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::config::Config;

/// One decoder layer. The Q projection is kept apart from K and V (so the queries and the new
/// K/V land in separate buffers); K and V, and gate and up, are fused.
#[derive(Clone, Debug)]
pub struct Layer {
    /// `[hidden]`, before attention.
    pub attn_norm: Vec<bf16>,
    /// `[q_dim, hidden]`.
    pub wq: Vec<bf16>,
    /// `[2 kv_dim, hidden]`: K rows then V rows.
    pub wkv: Vec<bf16>,
    /// `[hidden, q_dim]`.
    pub wo: Vec<bf16>,
    /// `[hidden]`, before the MLP.
    pub mlp_norm: Vec<bf16>,
    /// `[2 inter, hidden]`: gate rows then up rows (what `silu_and_mul` takes).
    pub wgu: Vec<bf16>,
    /// `[hidden, inter]`.
    pub wdown: Vec<bf16>,
}

/// All weights of a model.
#[derive(Clone, Debug)]
pub struct Weights {
    /// `[vocab, hidden]`.
    pub embed: Vec<bf16>,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// `[hidden]`.
    pub final_norm: Vec<bf16>,
    /// `[vocab, hidden]`.
    pub lm_head: Vec<bf16>,
}

fn normal(rng: &mut Rng, n: usize, std: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.normal() * std)).collect()
}

fn norm_weight(rng: &mut Rng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(1.0 + 0.1 * rng.normal()))
        .collect()
}

impl Weights {
    /// Random weights from `seed`: projections with standard deviation `1 / sqrt(fan_in)` (so
    /// activations keep their scale), norm weights near 1. Meant for small configs (it fills on
    /// one host thread).
    pub fn random(c: &Config, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let h = c.hidden;
        let sd = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let embed = normal(&mut rng, c.vocab * h, 1.0);
        let layers = (0..c.layers)
            .map(|_| Layer {
                attn_norm: norm_weight(&mut rng, h),
                wq: normal(&mut rng, c.q_dim() * h, sd(h)),
                wkv: normal(&mut rng, 2 * c.kv_dim() * h, sd(h)),
                wo: normal(&mut rng, h * c.q_dim(), sd(c.q_dim())),
                mlp_norm: norm_weight(&mut rng, h),
                wgu: normal(&mut rng, 2 * c.inter * h, sd(h)),
                wdown: normal(&mut rng, h * c.inter, sd(c.inter)),
            })
            .collect();
        Weights {
            embed,
            layers,
            final_norm: norm_weight(&mut rng, h),
            lm_head: normal(&mut rng, c.vocab * h, sd(h)),
        }
    }

    /// Rank `rank`'s part of `world`-way tensor parallelism, for the model of `c` (the full
    /// config; [`Config::shard`] gives the rank's): the rank's query heads (rows of `wq`), its
    /// KV heads (rows of the K half and of the V half of `wkv`), its MLP columns (rows of the
    /// gate half and of the up half of `wgu`); the matching columns of the row-parallel `wo` and
    /// `wdown`, whose partial products the ranks sum. Embedding, norms and LM head are whole on
    /// every rank.
    pub fn shard(&self, c: &Config, rank: usize, world: usize) -> Result<Self, String> {
        let r = c.shard(rank, world)?;
        let h = c.hidden;
        // Rows `at..at + n` of a row-major `[_, h]` matrix.
        let rows = |m: &[bf16], at: usize, n: usize| m[at * h..(at + n) * h].to_vec();
        // Columns `at..at + n` of a row-major `[h, width]` matrix.
        let cols = |m: &[bf16], width: usize, at: usize, n: usize| -> Vec<bf16> {
            m.chunks_exact(width)
                .flat_map(|row| row[at..at + n].iter().copied())
                .collect()
        };
        let (qd, kvd, i) = (r.q_dim(), r.kv_dim(), r.inter);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut wkv = rows(&l.wkv, rank * kvd, kvd);
                wkv.extend(rows(&l.wkv, c.kv_dim() + rank * kvd, kvd));
                let mut wgu = rows(&l.wgu, rank * i, i);
                wgu.extend(rows(&l.wgu, c.inter + rank * i, i));
                Layer {
                    attn_norm: l.attn_norm.clone(),
                    wq: rows(&l.wq, rank * qd, qd),
                    wkv,
                    wo: cols(&l.wo, c.q_dim(), rank * qd, qd),
                    mlp_norm: l.mlp_norm.clone(),
                    wgu,
                    wdown: cols(&l.wdown, c.inter, rank * i, i),
                }
            })
            .collect();
        Ok(Weights {
            embed: self.embed.clone(),
            layers,
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.clone(),
        })
    }

    /// Read a Llama checkpoint in one safetensors file (`model.embed_tokens.weight`,
    /// `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `...mlp.{gate,up,down}_proj.weight`,
    /// the two layer norms, `model.norm.weight`, `lm_head.weight`), bf16, shaped as `c` says.
    pub fn load(c: &Config, path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let get = |name: &str, shape: &[usize]| -> Result<Vec<bf16>, String> {
            let t = st.tensor(name).map_err(|e| format!("{name}: {e}"))?;
            if t.dtype() != Dtype::BF16 {
                return Err(format!("{name}: dtype {:?}, expected BF16", t.dtype()));
            }
            if t.shape() != shape {
                return Err(format!(
                    "{name}: shape {:?}, config {} expects {shape:?}",
                    t.shape(),
                    c.name
                ));
            }
            Ok(t.data()
                .chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                .collect())
        };
        let (h, q, kv, i) = (c.hidden, c.q_dim(), c.kv_dim(), c.inter);
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            let mut wkv = get(&p("self_attn.k_proj"), &[kv, h])?;
            wkv.extend(get(&p("self_attn.v_proj"), &[kv, h])?);
            let mut wgu = get(&p("mlp.gate_proj"), &[i, h])?;
            wgu.extend(get(&p("mlp.up_proj"), &[i, h])?);
            layers.push(Layer {
                attn_norm: get(&p("input_layernorm"), &[h])?,
                wq: get(&p("self_attn.q_proj"), &[q, h])?,
                wkv,
                wo: get(&p("self_attn.o_proj"), &[h, q])?,
                mlp_norm: get(&p("post_attention_layernorm"), &[h])?,
                wgu,
                wdown: get(&p("mlp.down_proj"), &[h, i])?,
            });
        }
        Ok(Weights {
            embed: get("model.embed_tokens.weight", &[c.vocab, h])?,
            layers,
            final_norm: get("model.norm.weight", &[h])?,
            lm_head: get("lm_head.weight", &[c.vocab, h])?,
        })
    }

    /// Write the weights as [`Weights::load`] reads them.
    #[allow(dead_code)] // used by tests/serve.rs
    pub fn save(&self, c: &Config, path: &Path) -> Result<(), String> {
        let (h, q, kv, i) = (c.hidden, c.q_dim(), c.kv_dim(), c.inter);
        let bytes = |xs: &[bf16]| -> Vec<u8> {
            xs.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
        };
        let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
            (
                "model.embed_tokens.weight".into(),
                vec![c.vocab, h],
                bytes(&self.embed),
            ),
            ("model.norm.weight".into(), vec![h], bytes(&self.final_norm)),
            (
                "lm_head.weight".into(),
                vec![c.vocab, h],
                bytes(&self.lm_head),
            ),
        ];
        for (l, w) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            let (k, v) = w.wkv.split_at(kv * h);
            let (g, u) = w.wgu.split_at(i * h);
            named.extend([
                (p("input_layernorm"), vec![h], bytes(&w.attn_norm)),
                (p("self_attn.q_proj"), vec![q, h], bytes(&w.wq)),
                (p("self_attn.k_proj"), vec![kv, h], bytes(k)),
                (p("self_attn.v_proj"), vec![kv, h], bytes(v)),
                (p("self_attn.o_proj"), vec![h, q], bytes(&w.wo)),
                (p("post_attention_layernorm"), vec![h], bytes(&w.mlp_norm)),
                (p("mlp.gate_proj"), vec![i, h], bytes(g)),
                (p("mlp.up_proj"), vec![i, h], bytes(u)),
                (p("mlp.down_proj"), vec![h, i], bytes(&w.wdown)),
            ]);
        }
        let views = named
            .iter()
            .map(|(n, s, b)| {
                TensorView::new(Dtype::BF16, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| format!("{n}: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let out = safetensors::serialize(views, None).map_err(|e| e.to_string())?;
        std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()))
    }
}
