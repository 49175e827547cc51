//! Checking a variant ahead of time: compile it with NVRTC into every kernel build the runtime
//! may load, on a machine without a GPU, and report every build that fails at once.
//!
//! The macro type-checks a variant's Rust, but only NVRTC sees the CUDA it lowers to inside each
//! kernel template. Without a check, a variant that NVRTC refuses (for one head dim, one dtype or
//! one architecture) fails on the GPU, at the first `run` that needs that instance. With
//! [`check_variant`] in a variant crate's tests, it fails in CI instead.

use std::fmt;

use ferrinfer_kernels::KernelConfig;
use ferrinfer_kernels::attention::prefill::Sm90Loop;

use crate::attention::dispatch;
use crate::device::SmResources;
use crate::error::{Error, Result};
use crate::jit::{Arch, Jit, KernelStats, Origin, nvrtc};
use crate::parallel;
use crate::variant::{Variant, VariantSpec};

/// One architecture of each arch class: a check compiles for both, whatever the machine has.
const ARCHES: [Arch; 2] = [Arch::SM80, Arch::SM90];

/// At most this many NVRTC compiles run at once (each may take several hundred MB of memory).
const MAX_THREADS: usize = 8;

/// Lines of each distinct compiler message kept in the error.
const MESSAGE_LINES: usize = 12;

/// Compile variant `V` with NVRTC into every kernel build the runtime may load, and return every
/// build that fails, not just the first. Needs NVRTC, not a GPU.
///
/// The instances are those of [`dispatch::instances`] for a typical SM
/// ([`SmResources::typical`]) of sm_80 (the sm80 class: Ampere, Ada, Blackwell) and of sm_90
/// (the sm90a class: Hopper): every kernel family, query tile and K/V tile, head dim and dtype.
/// An FA3 instance is built in each consumer loop the runtime may launch it with
/// ([`dispatch::loops`]: at head dim 128 also in order, for caches whose K/V go through
/// cp.async; `FERRINFER_SM90_OVERLAP` changes the set as it changes what the runtime launches),
/// so the report has a line for each build.
///
/// Kernels go through the process-wide JIT ([`Jit::global`]), so the disk cache of
/// `FERRINFER_CACHE_DIR` (else `$XDG_CACHE_HOME/ferrinfer` or `~/.cache/ferrinfer`) keeps them: a
/// CI that caches that directory compiles only what changed, and a serving process with the same
/// cache starts without compiling. With `FERRINFER_NO_JIT=1` nothing is compiled and the check
/// says whether the cache holds every instance. Use [`check_variant_with`] for another [`Jit`].
/// Compiles run in parallel, one thread per core (at most 8).
///
/// # Errors
/// - [`Error::CudaUnavailable`] when NVRTC cannot be loaded; it says where it looked and how to
///   install it (`pip install nvidia-cuda-nvrtc==13.0.88` or `nvidia-cuda-nvrtc-cu12==12.4.127` is
///   enough, no GPU or driver needed). With `FERRINFER_NO_JIT=1` NVRTC is not needed.
/// - [`Error::Compile`] when any build fails: it names the variant and, for each failing build,
///   its [`CheckedInstance::name`] and arch, with the first lines of NVRTC's log (or the
///   dispatcher's refusal). The message is written for a person: print it with `{}`.
///
/// # Example
/// A test in the crate that defines a variant (`V` is its `#[attention_variant]` type):
/// ```no_run
/// use ferrinfer_runtime::{Variant, check_variant};
///
/// fn variant_compiles_for_every_instance<V: Variant>() {
///     match check_variant::<V>() {
///         // One line per build: registers and spills, for tuning.
///         Ok(report) => println!("{report}"),
///         Err(e) => panic!("{e}"),
///     }
/// }
/// ```
pub fn check_variant<V: Variant>() -> Result<CheckReport> {
    check_spec_with(Jit::global(), V::SPEC)
}

/// [`check_variant`] with a given JIT: its caches, its NVRTC options, and its `compile` switch.
///
/// ```no_run
/// use ferrinfer_runtime::jit::{Jit, JitConfig};
/// use ferrinfer_runtime::{Variant, check_variant_with};
///
/// fn compiles_with_a_register_cap<V: Variant>() -> ferrinfer_runtime::Result<()> {
///     let jit = Jit::new(JitConfig {
///         extra_options: vec!["--maxrregcount=128".into()],
///         ..JitConfig::default()
///     });
///     let report = check_variant_with::<V>(&jit)?;
///     assert_eq!(report.spilling().count(), 0, "{report}");
///     Ok(())
/// }
/// ```
pub fn check_variant_with<V: Variant>(jit: &Jit) -> Result<CheckReport> {
    check_spec_with(jit, V::SPEC)
}

/// [`check_variant_with`] for a variant known by its spec, e.g. each one the registry lists.
pub fn check_spec_with(jit: &Jit, spec: &VariantSpec) -> Result<CheckReport> {
    let variant = spec.qualified_name();
    // Without JIT the cache alone answers; NVRTC need not exist.
    let needs_nvrtc = jit.config().compile;
    needs_nvrtc
        .then(nvrtc::version)
        .transpose()
        .map_err(|e| match e {
            Error::CudaUnavailable(m) => Error::CudaUnavailable(format!(
                "checking that variant {variant} compiles needs NVRTC (but no GPU or driver): {m}"
            )),
            e => e,
        })?;
    let jobs: Vec<(KernelConfig, Arch, Sm90Loop)> = ARCHES
        .iter()
        .flat_map(|&arch| {
            dispatch::instances_for(spec, arch, &SmResources::typical(arch))
                .into_iter()
                .flat_map(move |cfg| {
                    dispatch::loops(&cfg)
                        .into_iter()
                        .map(move |lp| (cfg, arch, lp))
                })
        })
        .collect();
    let results = compile_all(jit, spec, &jobs);
    let mut instances = Vec::with_capacity(jobs.len());
    let mut failures = Vec::new();
    for (&(config, arch, sm90_loop), result) in jobs.iter().zip(results) {
        match result {
            Ok(b) => instances.push(CheckedInstance {
                config,
                arch,
                sm90_loop,
                stats: b.kernel.stats,
                overlap_spilled: b.overlap_spilled,
                origin: b.kernel.origin,
                seconds: b.kernel.seconds,
            }),
            // Not the variant's fault, and the same for every instance: say it once.
            Err(e @ Error::CudaUnavailable(_)) => return Err(e),
            Err(error) => failures.push(Failure {
                instance: dispatch::build_name(&config, sm90_loop),
                kernel: config.name(),
                arch,
                error,
            }),
        }
    }
    if failures.is_empty() {
        Ok(CheckReport { variant, instances })
    } else {
        Err(failure_error(&variant, jobs.len(), &failures))
    }
}

/// Compile every job, in parallel; the results in the order of `jobs`.
fn compile_all(
    jit: &Jit,
    spec: &VariantSpec,
    jobs: &[(KernelConfig, Arch, Sm90Loop)],
) -> Vec<Result<dispatch::Build>> {
    parallel::map(jobs, MAX_THREADS, |(cfg, arch, lp)| {
        dispatch::build_loop_with(jit, spec, cfg, *lp, *arch)
    })
}

/// Every kernel build of a variant compiled: what [`check_variant`] returns.
///
/// `Display` writes a summary line, then one line per build with ptxas' numbers.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// The variant, as `module::path::Name`.
    pub variant: String,
    /// Every build, sm_80's then sm_90a's, each in the order of [`dispatch::instances`] (an
    /// FA3 instance's loops one after the other, as [`dispatch::loops`] lists them).
    pub instances: Vec<CheckedInstance>,
}

impl CheckReport {
    /// The builds that spill registers to local memory (slower; the dispatcher rebuilds an
    /// overlapping FA3 build in order, and falls back to the FA2 template or the narrower K/V
    /// tile where the plan offers one, and from the long prompts' FA3 tile to the 128-key one).
    pub fn spilling(&self) -> impl Iterator<Item = &CheckedInstance> {
        self.instances
            .iter()
            .filter(|i| i.stats.spill_stores > 0 || i.stats.spill_loads > 0)
    }

    /// How many builds were compiled for `arch`'s class.
    fn count(&self, arch: Arch) -> usize {
        self.instances.iter().filter(|i| i.arch == arch).count()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_arch: Vec<String> = ARCHES
            .iter()
            .map(|&a| format!("{} for {a}", self.count(a)))
            .collect();
        write!(
            f,
            "variant {}: all {} kernel builds compile ({}); {} of them spill registers",
            self.variant,
            self.instances.len(),
            per_arch.join(", "),
            self.spilling().count()
        )?;
        for i in &self.instances {
            write!(f, "\n  {i}")?;
        }
        Ok(())
    }
}

/// One kernel build of a [`CheckReport`]: an instance, in one FA3 consumer loop.
#[derive(Clone, Debug)]
pub struct CheckedInstance {
    /// The instance; [`KernelConfig::name`] names it.
    pub config: KernelConfig,
    /// The architecture it was compiled for.
    pub arch: Arch,
    /// The FA3 consumers' loop of this build ([`Sm90Loop::Default`] for every other instance).
    /// A `Default` build whose overlapping form spills is the in-order kernel: the runtime
    /// rebuilds it so, and so does the check.
    pub sm90_loop: Sm90Loop,
    /// ptxas' numbers: registers, spills, stack, static shared memory.
    pub stats: KernelStats,
    /// For a `Default` FA3 build, ptxas' numbers of its overlapping form when that spilled: the
    /// build (and `stats`) is then the in-order kernel, slower on long prompts (for the long
    /// prompts' tile, the spilling build, and the runtime runs the 128-key tile). A variant
    /// whose hooks hold many registers through the softmax shows it here.
    pub overlap_spilled: Option<KernelStats>,
    /// Whether it came from NVRTC or from a cache.
    pub origin: Origin,
    /// Seconds spent compiling or loading it.
    pub seconds: f64,
}

impl CheckedInstance {
    /// The build's name: [`KernelConfig::name`], with `/in-order` for the in-order FA3 build.
    pub fn name(&self) -> String {
        dispatch::build_name(&self.config, self.sm90_loop)
    }
}

impl fmt::Display for CheckedInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = match self.origin {
            Origin::Compiled => "compiled",
            Origin::Disk => "disk cache",
            Origin::Memory => "memory cache",
        };
        write!(
            f,
            "{:<43} {:<7} {:>3} registers, {:>4} B spill stores, {:>4} B spill loads \
             ({origin}, {:.2} s)",
            self.name(),
            self.arch.sm_name(),
            self.stats.registers,
            self.stats.spill_stores,
            self.stats.spill_loads,
            self.seconds
        )?;
        match &self.overlap_spilled {
            Some(o) => write!(f, "; {}", dispatch::overlap_spill_note(&self.config, o)),
            None => Ok(()),
        }
    }
}

/// One build that did not compile.
struct Failure {
    /// [`CheckedInstance::name`].
    instance: String,
    /// [`KernelConfig::name`]: what a dispatcher's refusal names (an in-order build's too).
    kernel: String,
    arch: Arch,
    error: Error,
}

impl Failure {
    /// What went wrong: NVRTC's log (the error names the kernel already), else the error.
    fn message(&self) -> String {
        match &self.error {
            Error::Compile { log, .. } => log.clone(),
            e => e.to_string(),
        }
    }
}

/// What two failures must share to be "the same error": NVRTC's error lines (without the kernel's
/// name and the line number in its translation unit, which differ between families) with the
/// source line each quotes; for other errors the whole message, with the kernel's name
/// ([`Failure::kernel`]) taken out.
fn same_error_key(message: &str, kernel: &str) -> String {
    let lines: Vec<&str> = message.lines().collect();
    let mut key = String::new();
    for (i, line) in lines.iter().enumerate() {
        let Some((_, error)) = line.split_once("): error") else {
            continue;
        };
        key.push_str(error);
        key.push('\n');
        key.push_str(lines.get(i + 1).map_or("", |l| l.trim()));
        key.push('\n');
    }
    if key.is_empty() {
        message.replace(kernel, "{instance}")
    } else {
        key
    }
}

/// The error for `failures` out of `total` builds of `variant`: each failing build on its own
/// line; each distinct error (see [`same_error_key`]) in full once, the first [`MESSAGE_LINES`]
/// lines of its message, and later builds with the same error refer to the first.
fn failure_error(variant: &str, total: usize, failures: &[Failure]) -> Error {
    let mut log = String::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    for f in failures {
        let at = format!("{} on {}", f.instance, f.arch.sm_name());
        let message = f.message();
        let key = same_error_key(&message, &f.kernel);
        if !log.is_empty() {
            log.push('\n');
        }
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
            log.push_str(&format!("{at}: the same error as {first}"));
            continue;
        }
        log.push_str(&format!("{at}:"));
        let lines: Vec<&str> = message
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        for line in lines.iter().take(MESSAGE_LINES) {
            log.push_str("\n    ");
            log.push_str(line);
        }
        if lines.len() > MESSAGE_LINES {
            log.push_str(&format!(
                "\n    ... ({} more lines)",
                lines.len() - MESSAGE_LINES
            ));
        }
        seen.push((key, at));
    }
    Error::Compile {
        kernel: format!(
            "variant {variant} in {} of {total} kernel builds",
            failures.len()
        ),
        log,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrinfer_kernels::{DType, KernelKind};

    fn failure(instance: &str, arch: Arch, log: &str) -> Failure {
        Failure {
            instance: instance.to_string(),
            kernel: instance.to_string(),
            arch,
            error: Error::Compile {
                kernel: format!("V.{instance}"),
                log: log.to_string(),
            },
        }
    }

    #[test]
    fn every_failure_is_named_and_each_message_shown_once() {
        let e = failure_error(
            "my_crate::Bad",
            50,
            &[
                failure(
                    "prefill_hd64_bf16_q16",
                    Arch::SM80,
                    "V.prefill_hd64_bf16_q16(10): error: identifier \"nope\" is undefined",
                ),
                failure(
                    "prefill_hd64_bf16_q64",
                    Arch::SM80,
                    "V.prefill_hd64_bf16_q64(11): error: identifier \"nope\" is undefined",
                ),
                failure(
                    "decode_hd64_bf16",
                    Arch::SM90,
                    &(0..20).map(|i| format!("line {i}\n")).collect::<String>(),
                ),
                Failure {
                    instance: "decode_hd128_f16".into(),
                    kernel: "decode_hd128_f16".into(),
                    arch: Arch::SM90,
                    error: Error::unsupported("not this one"),
                },
            ],
        );
        let Error::Compile { kernel, log } = &e else {
            panic!("{e}")
        };
        assert_eq!(kernel, "variant my_crate::Bad in 4 of 50 kernel builds");
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines[0], "prefill_hd64_bf16_q16 on sm_80:");
        assert!(
            lines[1].contains("V.prefill_hd64_bf16_q16(10): error"),
            "{log}"
        );
        assert_eq!(
            lines[2],
            "prefill_hd64_bf16_q64 on sm_80: the same error as prefill_hd64_bf16_q16 on sm_80"
        );
        assert_eq!(lines[3], "decode_hd64_bf16 on sm_90a:");
        assert_eq!(lines[4], "    line 0");
        assert_eq!(lines[3 + MESSAGE_LINES], "    line 11");
        assert_eq!(lines[4 + MESSAGE_LINES], "    ... (8 more lines)");
        assert_eq!(lines[5 + MESSAGE_LINES], "decode_hd128_f16 on sm_90a:");
        assert_eq!(lines[6 + MESSAGE_LINES], "    unsupported: not this one");
        assert!(
            e.to_string().starts_with(
                "NVRTC failed to compile variant my_crate::Bad in 4 of 50 kernel builds:\n"
            ),
            "{e}"
        );
    }

    #[test]
    fn the_report_lists_every_build() {
        let build = |kind, arch, sm90_loop| CheckedInstance {
            config: dispatch::config(arch, kind, 128, DType::Bf16).unwrap(),
            arch,
            sm90_loop,
            stats: KernelStats {
                registers: 96,
                spill_stores: if arch == Arch::SM90 { 8 } else { 0 },
                ..KernelStats::default()
            },
            overlap_spilled: (kind == KernelKind::Prefill
                && arch == Arch::SM90
                && sm90_loop == Sm90Loop::Default)
                .then_some(KernelStats {
                    spill_stores: 40,
                    spill_loads: 24,
                    ..KernelStats::default()
                }),
            origin: Origin::Compiled,
            seconds: 0.5,
        };
        let report = CheckReport {
            variant: "my_crate::V".into(),
            instances: vec![
                build(KernelKind::Prefill, Arch::SM80, Sm90Loop::Default),
                build(KernelKind::Decode, Arch::SM80, Sm90Loop::Default),
                build(KernelKind::Decode, Arch::SM90, Sm90Loop::Default),
                build(KernelKind::Prefill, Arch::SM90, Sm90Loop::Default),
                build(KernelKind::Prefill, Arch::SM90, Sm90Loop::InOrder),
            ],
        };
        assert_eq!(report.spilling().count(), 3);
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "variant my_crate::V: all 5 kernel builds compile (2 for sm_80, 3 for sm_90a); \
             3 of them spill registers"
        );
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[3].contains("decode_hd128_bf16_sm90a"), "{text}");
        assert!(lines[3].contains("sm_90a"), "{text}");
        assert!(lines[3].contains("8 B spill stores"), "{text}");
        // The in-order build of an instance is a line of its own, named apart.
        let name = report.instances[3].name();
        assert!(!name.ends_with("/in-order"), "{name}");
        assert_eq!(report.instances[4].name(), format!("{name}/in-order"));
        assert!(lines[5].contains(&format!("{name}/in-order ")), "{text}");
        // A default build that fell back to the in-order loop says so, with the spill it avoided.
        assert!(
            lines[4].ends_with("; in order: the overlapping loop spilled 40 B stores, 24 B loads"),
            "{text}"
        );
        assert!(!lines[5].contains("in order:"), "{text}");
    }

    #[test]
    fn an_in_order_build_refused_as_its_instance_is_the_same_error() {
        let refused = |build: &str, kernel: &str| Failure {
            instance: build.into(),
            kernel: kernel.into(),
            arch: Arch::SM90,
            error: Error::unsupported(format!("{kernel} for V: no")),
        };
        let e = failure_error(
            "V",
            2,
            &[
                refused("prefill_a/in-order", "prefill_a"),
                refused("prefill_b", "prefill_b"),
            ],
        );
        let Error::Compile { log, .. } = &e else {
            panic!("{e}")
        };
        assert!(
            log.ends_with("prefill_b on sm_90a: the same error as prefill_a/in-order on sm_90a"),
            "{log}"
        );
    }

    #[test]
    fn both_arch_classes_are_checked() {
        let classes: Vec<_> = ARCHES
            .iter()
            .map(|&a| dispatch::arch_class(a).unwrap())
            .collect();
        assert_eq!(classes, ferrinfer_kernels::ArchClass::ALL);
    }
}
