//! Kernels beside attention, one file per op: the arguments, the translation unit and the launch
//! geometry of each. Every op file adds one row to [`OPS`] (so CI compiles all its instances)
//! and builds its units with [`op_unit`].

pub mod activation;
pub mod merge_states;
pub mod norm;
pub mod rope;
pub mod sampling;

use crate::sources::Sources;
use crate::tu::{TranslationUnit, inline_header};

/// Every op instance, one row per op file: the op's name and a function that assembles the
/// translation units of all its instances (each dtype, vector width, ...). CI hands every unit
/// to NVRTC for sm_80 and sm_90a.
pub const OPS: &[(&str, AllUnits)] = &[
    ("merge_states", merge_states::all_units),
    ("norm", norm::all_units),
    ("activation", activation::all_units),
    ("sampling", sampling::all_units),
    ("rope", rope::all_units),
];

/// An op file's function that assembles every instance's unit.
pub type AllUnits = fn() -> Result<Vec<TranslationUnit>, String>;

/// The translation unit of one op instance: `header` (a path under `kernels/cuda`, e.g.
/// `ops/norm.cuh`) inlined with everything it includes, then one entry
/// `extern "C" __global__ void __launch_bounds__(threads) ferrinfer_<kernel>(const <args> args)`
/// whose body is `body` (e.g. `fi::rmsnorm<fi::bf16, 8>(args);`).
///
/// `kernel` names the instance (`rmsnorm_bf16_v8`): it is the NVRTC program name, the entry's
/// suffix and part of the runtime's module key, so it must say everything that tells two instances
/// apart.
pub fn op_unit(
    kernel: &str,
    header: &str,
    threads: u32,
    args: &str,
    body: &str,
) -> Result<TranslationUnit, String> {
    assemble(&Sources::from_env(), kernel, header, threads, args, body)
}

pub(crate) fn assemble(
    sources: &Sources,
    kernel: &str,
    header: &str,
    threads: u32,
    args: &str,
    body: &str,
) -> Result<TranslationUnit, String> {
    if kernel.is_empty()
        || !kernel
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "op kernel name {kernel:?} must be a C identifier tail (letters, digits, _)"
        ));
    }
    let entry = format!("ferrinfer_{kernel}");
    let mut source = format!(
        "// ferrinfer kernel {kernel}.\n\
         // Assembled by ferrinfer-kernels: template headers, then the entry.\n"
    );
    inline_header(
        sources,
        header,
        &mut Vec::new(),
        &mut Vec::new(),
        &mut source,
    )?;
    source.push_str(&format!(
        "\n// ---- entry ----\n\
         extern \"C\" __global__ void __launch_bounds__({threads})\n\
         {entry}(const {args} args) {{\n  {body}\n}}\n"
    ));
    Ok(TranslationUnit {
        name: kernel.to_string(),
        source,
        entry,
        merge_entry: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_assembles_distinct_self_contained_units() {
        let mut names = std::collections::BTreeSet::new();
        for (op, units) in OPS {
            let units = units().unwrap_or_else(|e| panic!("{op}: {e}"));
            assert!(!units.is_empty(), "{op} has no instance");
            for tu in units {
                assert!(!tu.source.contains("#include") && !tu.source.contains("#pragma once"));
                assert_eq!(tu.entry, format!("ferrinfer_{}", tu.name));
                assert!(tu.source.contains(&format!("{}(const ", tu.entry)));
                assert!(
                    names.insert(tu.name.clone()),
                    "two instances named {}",
                    tu.name
                );
            }
        }
    }

    #[test]
    fn op_unit_refuses_a_name_that_is_not_an_identifier() {
        let e = op_unit("a b", "ops/merge_states.cuh", 128, "fi::X", "").unwrap_err();
        assert!(e.contains("\"a b\""), "{e}");
    }
}
