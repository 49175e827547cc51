//! Assembling one translation unit: the template's headers inlined (no `#include` is left, so NVRTC
//! needs no include path), the variant's `struct Params` and `struct Variant`, and an `extern "C"`
//! entry that instantiates the template. The text is deterministic: it is hashed into cache keys.

use crate::attention::merge;
use crate::config::{DType, KernelConfig};
use crate::sources::Sources;

/// The lowered variant, as the runtime hands it over.
pub struct VariantSource<'a> {
    /// Variant name, for comments and the program name.
    pub name: &'a str,
    /// `struct Params { ... };` (from `ferrinfer_runtime::variant::params::cuda_struct`).
    pub params_struct: &'a str,
    /// `struct Variant { ... };` (from `VariantSpec::cuda`).
    pub cuda: &'a str,
}

/// A self-contained CUDA source (every header inlined) and the name of its `extern "C"` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslationUnit {
    /// Program name for NVRTC and logs, e.g. `SoftCap.prefill_hd128_bf16`.
    pub name: String,
    /// The CUDA text.
    pub source: String,
    /// The kernel to launch, e.g. `ferrinfer_prefill_hd128_bf16`; it takes
    /// `(const fi::AttnArgs args, const Params params)` by value (an FA3 form also its TMA maps,
    /// `const __grid_constant__ fi::Sm90Maps maps`).
    pub entry: String,
    /// The merge kernel of split-KV work lists (`(args, params)`): every attention unit has one;
    /// other units (merge_states) have none.
    pub merge_entry: Option<String>,
}

pub(crate) fn cuda_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "fi::f16",
        DType::Bf16 => "fi::bf16",
    }
}

/// The translation unit of `cfg` with `variant` spliced in, from the compiled-in headers (or
/// `$FERRINFER_KERNEL_DIR`). Errors name the problem: an unsupported head dim, a variant text that
/// lacks its struct, an unreadable or unresolvable header.
pub fn translation_unit(
    cfg: &KernelConfig,
    variant: &VariantSource<'_>,
) -> Result<TranslationUnit, String> {
    assemble(&Sources::from_env(), cfg, variant)
}

pub(crate) fn assemble(
    sources: &Sources,
    cfg: &KernelConfig,
    variant: &VariantSource<'_>,
) -> Result<TranslationUnit, String> {
    let family = cfg.kind.family();
    family.check(cfg)?;
    if !variant.params_struct.contains("struct Params") {
        return Err(format!(
            "variant {}: params_struct does not define `struct Params`",
            variant.name
        ));
    }
    if !variant.cuda.contains("struct Variant") {
        return Err(format!(
            "variant {}: cuda does not define `struct Variant`",
            variant.name
        ));
    }
    let kernel = cfg.name();
    let entry = format!("ferrinfer_{kernel}");
    // Names go into `//` comments: one line each.
    let variant_name = variant.name.replace(['\n', '\r'], " ");

    let mut source = format!(
        "// ferrinfer kernel {kernel}, variant {variant_name}.\n\
         // Assembled by ferrinfer-kernels: template headers, then the variant's Params\n\
         // and hooks, then the entry.\n"
    );
    let mut done = Vec::new();
    // dsl.cuh first: the variant's code may call any of its helpers; then the family's kernel and
    // the merge pass every attention family has.
    for root in [
        "variant/dsl.cuh",
        (family.header)(cfg),
        "attention/merge.cuh",
    ] {
        inline_header(sources, root, &mut done, &mut Vec::new(), &mut source)?;
    }
    source.push_str("\n// ---- variant parameters ----\n");
    push_block(&mut source, variant.params_struct);
    source.push_str("\n// ---- variant hooks ----\n");
    push_block(&mut source, variant.cuda);
    source.push_str(&format!(
        "\n// ---- entry ----\n\
         extern \"C\" __global__ void __launch_bounds__({threads})\n\
         {entry}(const fi::AttnArgs args, const Params params{decl}) {{\n  \
         {function}<Variant, Params, {dtype}, {d}{extra}>(args, params{pass});\n}}\n",
        threads = (family.launch_bounds)(cfg),
        decl = (family.entry_extra)(cfg).0,
        pass = (family.entry_extra)(cfg).1,
        function = (family.function)(cfg),
        dtype = cuda_dtype(cfg.dtype),
        d = cfg.head_dim_qk,
        extra = (family.template_args)(cfg),
    ));
    let (merge_entry, merge_text) = merge::entry(&entry, cfg);
    source.push_str(&merge_text);
    Ok(TranslationUnit {
        name: format!("{variant_name}.{kernel}"),
        source,
        entry,
        merge_entry: Some(merge_entry),
    })
}

fn push_block(out: &mut String, text: &str) {
    out.push_str(text);
    if !text.ends_with('\n') {
        out.push('\n');
    }
}

/// Appends `name` after the headers it includes (depth first, each header once, `#pragma once`
/// dropped). Only `#include "x.cuh"` of our own headers is allowed: the unit is self-contained.
pub(crate) fn inline_header(
    sources: &Sources,
    name: &str,
    done: &mut Vec<String>,
    stack: &mut Vec<String>,
    out: &mut String,
) -> Result<(), String> {
    if done.iter().any(|d| d == name) {
        return Ok(());
    }
    if stack.iter().any(|s| s == name) {
        return Err(format!(
            "kernel headers include each other: {} -> {name}",
            stack.join(" -> ")
        ));
    }
    stack.push(name.to_string());
    let text = sources.header(name)?;
    let mut body = String::with_capacity(text.len());
    for (n, line) in text.lines().enumerate() {
        let directive = line.trim();
        if directive == "#pragma once" {
            continue;
        }
        if let Some(rest) = directive.strip_prefix("#include") {
            let target = rest
                .trim()
                .strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .ok_or_else(|| {
                    format!(
                        "{name}:{}: only `#include \"header.cuh\"` of a ferrinfer header is \
                         allowed (NVRTC gets a self-contained unit): {directive}",
                        n + 1
                    )
                })?;
            inline_header(sources, target, done, stack, out)?;
            continue;
        }
        body.push_str(line);
        body.push('\n');
    }
    out.push_str(&format!("\n// ---- {name} ----\n"));
    out.push_str(&body);
    stack.pop();
    done.push(name.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::AttnArgs;
    use crate::attention::decode::DECODE_MAX_WARPS;
    use crate::attention::prefill::PREFILL_WARPS;
    use crate::config::{ArchClass, HEAD_DIMS, KernelKind};
    use crate::launch_dims;

    const PARAMS: &str = "struct Params {\n  float cap;\n};\n";
    const VARIANT: &str = "struct Variant {\n  static constexpr bool kSoftmax = true;\n  \
        static constexpr bool kHasQuery = false;\n  static constexpr bool kHasKey = false;\n  \
        static constexpr bool kHasLogits = true;\n  static constexpr bool kHasMask = false;\n  \
        static constexpr bool kHasOutput = false;\n  static constexpr bool kHasSink = false;\n  \
        __device__ __forceinline__ static float logits(const Params& self, float s,\n      \
        const fi::Pos& at) {\n    \
        return self.cap * tanhf(s / self.cap);\n  }\n};\n";

    fn variant() -> VariantSource<'static> {
        VariantSource {
            name: "SoftCap",
            params_struct: PARAMS,
            cuda: VARIANT,
        }
    }

    fn configs() -> Vec<KernelConfig> {
        let mut all = Vec::new();
        for kind in KernelKind::ALL {
            for head_dim in HEAD_DIMS {
                for dtype in DType::ALL {
                    all.push(KernelConfig::new(kind, head_dim, dtype, ArchClass::Sm80));
                }
            }
        }
        all
    }

    #[test]
    fn assembly_is_deterministic_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for cfg in configs() {
            let a = translation_unit(&cfg, &variant()).unwrap();
            let b = translation_unit(&cfg, &variant()).unwrap();
            assert_eq!(a, b);
            assert!(
                seen.insert(a.source.clone()),
                "{} repeats another instance",
                cfg.name()
            );
            assert_eq!(a.entry, format!("ferrinfer_{}", cfg.name()));
            assert_eq!(a.name, format!("SoftCap.{}", cfg.name()));
        }
    }

    #[test]
    fn includes_are_resolved_once_in_dependency_order() {
        for cfg in configs() {
            let tu = translation_unit(&cfg, &variant()).unwrap();
            let s = &tu.source;
            assert!(!s.contains("#include"), "{}", cfg.name());
            assert!(!s.contains("#pragma once"), "{}", cfg.name());
            let at = |marker: &str| s.find(marker).unwrap_or_else(|| panic!("{marker} missing"));
            for name in [
                "core/abi.cuh",
                "variant/dsl.cuh",
                "core/dtype.cuh",
                "attention/kv.cuh",
                "variant/hooks.cuh",
                "attention/merge.cuh",
            ] {
                let marker = format!("// ---- {name} ----");
                assert_eq!(s.matches(&marker).count(), 1, "{name} in {}", cfg.name());
            }
            let (kernel, other) = match cfg.kind {
                KernelKind::Prefill => ("attention/prefill.cuh", "attention/decode.cuh"),
                KernelKind::Decode => ("attention/decode.cuh", "attention/prefill.cuh"),
            };
            assert!(!s.contains(&format!("// ---- {other} ----")));
            // Each header follows the ones it includes; the variant follows every header.
            assert!(at("// ---- core/abi.cuh ----") < at("// ---- attention/kv.cuh ----"));
            assert!(at("// ---- variant/dsl.cuh ----") < at("// ---- variant/hooks.cuh ----"));
            assert!(at("// ---- variant/hooks.cuh ----") < at(&format!("// ---- {kernel} ----")));
            assert!(at(&format!("// ---- {kernel} ----")) < at("struct Params {"));
            assert!(at("struct Params {") < at("struct Variant {"));
            assert!(at("struct Variant {") < at("extern \"C\" __global__"));
            assert!(s.starts_with(&format!(
                "// ferrinfer kernel {}, variant SoftCap.",
                cfg.name()
            )));
        }
    }

    #[test]
    fn entry_instantiates_the_template() {
        let cfg = KernelConfig::new(KernelKind::Decode, 256, DType::Bf16, ArchClass::Sm80);
        let tu = translation_unit(&cfg, &variant()).unwrap();
        assert!(
            tu.source.contains(
                "ferrinfer_decode_hd256_bf16(const fi::AttnArgs args, const Params params)"
            )
        );
        assert!(
            tu.source
                .contains("fi::decode<Variant, Params, fi::bf16, 256>(args, params);")
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        let cfg = KernelConfig::new(KernelKind::Prefill, 96, DType::F16, ArchClass::Sm80);
        assert!(
            translation_unit(&cfg, &variant())
                .unwrap_err()
                .contains("head_dim 96")
        );
        let mla = cfg.with_head_dims(128, 64);
        let e = translation_unit(&mla, &variant()).unwrap_err();
        assert!(
            e.contains("128 and 64") && e.contains("equal head dims"),
            "{e}"
        );
        let cfg = cfg.with_head_dims(128, 128);
        let e = translation_unit(&cfg.with_kv_dtype(DType::Bf16), &variant()).unwrap_err();
        assert!(e.contains("bf16 KV cache for f16 queries"), "{e}");
        let no_params = VariantSource {
            params_struct: "",
            ..variant()
        };
        assert!(
            translation_unit(&cfg, &no_params)
                .unwrap_err()
                .contains("struct Params")
        );
        let no_hooks = VariantSource {
            cuda: "",
            ..variant()
        };
        assert!(
            translation_unit(&cfg, &no_hooks)
                .unwrap_err()
                .contains("struct Variant")
        );
    }

    /// A scratch copy of the headers in a fresh directory.
    fn header_dir(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferrinfer-kernels-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for name in crate::HEADER_NAMES {
            std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
            std::fs::write(dir.join(name), Sources::BuiltIn.header(name).unwrap()).unwrap();
        }
        dir
    }

    #[test]
    fn kernel_dir_override_is_read() {
        let cfg = KernelConfig::new(KernelKind::Prefill, 64, DType::F16, ArchClass::Sm80);
        let dir = header_dir("override");
        let same = assemble(&Sources::Dir(dir.clone()), &cfg, &variant()).unwrap();
        assert_eq!(same, translation_unit(&cfg, &variant()).unwrap());

        let edited = Sources::BuiltIn.header("core/warp.cuh").unwrap() + "// edited on disk\n";
        std::fs::write(dir.join("core/warp.cuh"), edited).unwrap();
        let tu = assemble(&Sources::Dir(dir.clone()), &cfg, &variant()).unwrap();
        assert!(tu.source.contains("// edited on disk"));

        std::fs::remove_file(dir.join("variant/hooks.cuh")).unwrap();
        let e = assemble(&Sources::Dir(dir.clone()), &cfg, &variant()).unwrap_err();
        assert!(
            e.contains("variant/hooks.cuh") && e.contains("FERRINFER_KERNEL_DIR"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn system_includes_and_cycles_are_refused() {
        let cfg = KernelConfig::new(KernelKind::Prefill, 64, DType::F16, ArchClass::Sm80);
        let dir = header_dir("includes");
        let warp = Sources::BuiltIn.header("core/warp.cuh").unwrap();
        std::fs::write(
            dir.join("core/warp.cuh"),
            format!("#include <cuda_fp16.h>\n{warp}"),
        )
        .unwrap();
        let e = assemble(&Sources::Dir(dir.clone()), &cfg, &variant()).unwrap_err();
        assert!(
            e.contains("core/warp.cuh:1") && e.contains("cuda_fp16.h"),
            "{e}"
        );

        std::fs::write(
            dir.join("core/warp.cuh"),
            format!("#include \"attention/prefill.cuh\"\n{warp}"),
        )
        .unwrap();
        let e = assemble(&Sources::Dir(dir.clone()), &cfg, &variant()).unwrap_err();
        assert!(
            e.contains("core/warp.cuh -> attention/prefill.cuh")
                || e.contains("include each other"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn block_sizes_match_the_headers() {
        let prefill = Sources::BuiltIn.header("attention/prefill.cuh").unwrap();
        assert!(prefill.contains(&format!("kPrefillWarps = {PREFILL_WARPS};")));
        let decode = Sources::BuiltIn.header("attention/decode.cuh").unwrap();
        assert!(decode.contains(&format!("kDecodeMaxWarps = {DECODE_MAX_WARPS};")));
    }

    #[test]
    fn work_list_kernels_launch_one_cta_per_item() {
        for kind in KernelKind::ALL {
            for head_dim in HEAD_DIMS {
                let cfg = KernelConfig {
                    cta_tile_q: if kind == KernelKind::Prefill { 64 } else { 0 },
                    ..KernelConfig::new(kind, head_dim, DType::Bf16, ArchClass::Sm80)
                };
                let tu = translation_unit(&cfg, &variant()).unwrap();
                assert_eq!(tu.merge_entry, Some(format!("{}_merge", tu.entry)));
                let args = AttnArgs {
                    num_items: 300,
                    num_qo_heads: 32,
                    num_kv_heads: 8,
                    ..AttnArgs::default()
                };
                let d = launch_dims(&cfg, &args);
                assert_eq!(d.grid, [300, 1, 1], "{}", cfg.name());
                assert!(d.block[0] <= 1024 && d.block[0].is_multiple_of(32));
                // An empty work list still launches (and returns at once).
                let d = launch_dims(&cfg, &AttnArgs::default());
                assert!(d.grid.iter().all(|&g| g >= 1), "{d:?}");
                let m = crate::merge_launch_dims(&cfg, &args, 77);
                assert_eq!(m.grid[0], 77);
                assert!(m.grid[1] * m.block[0] / 32 >= 32, "a warp per head");
            }
        }
    }
}
