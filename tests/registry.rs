//! The registry sees every built-in variant and the variants of other crates (this test is one),
//! each with its hooks, softmax switch and parameter layout.

use ferrinfer::__private::{Extent, ParamField, ParamType};
use ferrinfer::prelude::*;
use ferrinfer::{Hooks, Variant};

/// A variant outside the `ferrinfer` crate, using most of the DSL.
#[derive(AttentionParams)]
pub struct Banded {
    pub scale: f32,
    pub width: u32,
    pub enabled: bool,
    pub bias: Array<f32>,
}

#[attention_variant]
impl Banded {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        let s = s * self.scale;
        let h = at.qo_head % self.bias.len();
        let s = if self.enabled {
            let b = self.bias[h];
            s + b
        } else {
            s
        };
        s.max(f32::NEG_INFINITY)
    }

    fn mask(&self, at: Pos) -> bool {
        let q_abs = at.qo_pos + at.kv_len - at.qo_len;
        if at.kv_pos > q_abs {
            return true;
        }
        q_abs - at.kv_pos <= self.width
    }

    fn output(&self, o: f32, i: u32, _at: Pos) -> f32 {
        if i.is_multiple_of(2) { o } else { -o }
    }
}

fn find(name: &str) -> &'static ferrinfer::VariantSpec {
    let found: Vec<_> = ferrinfer::variants().filter(|v| v.name == name).collect();
    assert_eq!(found.len(), 1, "{name} registered {} times", found.len());
    found[0]
}

#[test]
fn every_builtin_is_registered() {
    for name in [
        "Standard",
        "SoftCap",
        "Alibi",
        "SlidingWindow",
        "CustomMask",
        "FlashSigmoid",
        "LlamaRope",
        "AttentionSink",
    ] {
        let spec = find(name);
        assert_eq!(
            spec.module_path.split("::").next(),
            Some("ferrinfer"),
            "{name}"
        );
        assert!(spec.cuda.contains("struct Variant {"), "{name}");
    }
    assert_eq!(find("SoftCap").hooks.names(), ["logits"]);
    assert_eq!(find("LlamaRope").hooks.names(), ["query", "key"]);
    assert_eq!(find("AttentionSink").hooks.names(), ["sink"]);
    assert!(!find("FlashSigmoid").softmax);
    assert_eq!(
        find("CustomMask").params,
        [
            ParamField::new("bits", ParamType::ArrayU32),
            ParamField::new("offsets", ParamType::ArrayU32).covering(&[Extent::Batch]),
        ]
    );
    assert_eq!(
        find("Alibi").params,
        [ParamField::new("slopes", ParamType::ArrayF32).covering(&[Extent::QoHeads])]
    );
    assert_eq!(
        find("AttentionSink").params,
        [ParamField::new("sinks", ParamType::ArrayF32).covering(&[Extent::QoHeads])]
    );
}

#[test]
fn a_variant_of_another_crate_is_found() {
    let spec = find("Banded");
    assert!(std::ptr::eq(spec, Banded::SPEC));
    assert_eq!(spec.module_path, module_path!());
    assert_eq!(spec.qualified_name(), "registry::Banded");
    assert_eq!(
        spec.hooks,
        Hooks {
            logits: true,
            mask: true,
            output: true,
            ..Hooks::default()
        }
    );
    assert!(spec.softmax);
    assert_eq!(
        spec.params,
        [
            ParamField::new("scale", ParamType::F32),
            ParamField::new("width", ParamType::U32),
            ParamField::new("enabled", ParamType::Bool),
            ParamField::new("bias", ParamType::ArrayF32),
        ]
    );
}

/// Every form of `#[cover]`: one word, a product, a fixed count, and each word.
#[derive(AttentionParams)]
pub struct Covered {
    pub scale: f32,
    #[cover(qo_heads)]
    pub per_head: Array<f32>,
    #[cover(batch * kv_heads)]
    pub per_request_and_kv_head: Array<i32>,
    /// Raw identifiers and suffixed literals are accepted too.
    #[cover(r#head_dim * 2u32)]
    pub per_element: Array<u32>,
    #[cover(16)]
    pub fixed: Array<f32>,
    pub free: Array<f32>,
}

#[test]
fn cover_goes_into_the_fields() {
    assert_eq!(
        Covered::FIELDS,
        [
            ParamField::new("scale", ParamType::F32),
            ParamField::new("per_head", ParamType::ArrayF32).covering(&[Extent::QoHeads]),
            ParamField::new("per_request_and_kv_head", ParamType::ArrayI32)
                .covering(&[Extent::Batch, Extent::KvHeads]),
            ParamField::new("per_element", ParamType::ArrayU32)
                .covering(&[Extent::HeadDim, Extent::Fixed(2)]),
            ParamField::new("fixed", ParamType::ArrayF32).covering(&[Extent::Fixed(16)]),
            ParamField::new("free", ParamType::ArrayF32),
        ]
    );
}

#[test]
fn the_trait_forwards_to_the_hooks() {
    let v = Banded {
        scale: 2.0,
        width: 1,
        enabled: true,
        bias: Array::new(vec![0.5, 1.5]),
    };
    let at = Pos {
        qo_head: 3,
        qo_pos: 2,
        kv_pos: 0,
        qo_len: 3,
        kv_len: 3,
        head_dim: 8,
        ..Pos::default()
    };
    assert_eq!(Variant::logits(&v, 1.0, at), 3.5);
    assert!(!Variant::mask(&v, at));
    assert!(Variant::mask(&v, Pos { kv_pos: 1, ..at }));
    assert_eq!(Variant::output(&v, 1.0, 3, at), -1.0);
    // Undefined hooks keep the trait's identity defaults.
    assert_eq!(Variant::query(&v, 0.25, 9.0, 1, at), 0.25);
}

/// The built-in Alibi states that its slopes cover the query heads: the CPU reference refuses
/// a batch with more heads than slopes before any hook runs (today's code panics in the hook).
#[test]
fn short_alibi_slopes_are_an_error_not_a_panic() {
    use ferrinfer::attention::reference;
    use ferrinfer::variants::Alibi;
    use ferrinfer::{Batch, Heads, KvIndex, KvLayout};

    let heads = Heads::new(32, 8, 16).unwrap();
    let kv = KvIndex::ragged(&[0, 3, 5], KvLayout::Nhd).unwrap();
    let batch = Batch::new(heads, &[0, 2, 3], kv).unwrap();
    let q = vec![0.25; 3 * 32 * 16];
    let kv = vec![0.5; 5 * 8 * 16];
    let err = reference::attention(&Alibi::new(8), &batch, &q, &kv, &kv).unwrap_err();
    assert!(matches!(err, ferrinfer::Error::InvalidInput(_)), "{err}");
    assert!(
        err.to_string()
            .contains("Alibi.slopes has 8 elements but must cover num_qo_heads = 32"),
        "{err}"
    );
    assert!(reference::attention(&Alibi::new(32), &batch, &q, &kv, &kv).is_ok());
}
