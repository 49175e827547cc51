//! Compiling kernels ahead of time into a [`Jit`]'s disk cache, so that a server can start with
//! `FERRINFER_NO_JIT=1` and no NVRTC: the library half of the `ferrinfer precompile` command.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ferrinfer_kernels::attention::prefill::Sm90Loop;
use ferrinfer_kernels::{DType, KernelConfig, TranslationUnit};

use super::{Jit, Origin};
use crate::attention::dispatch;
use crate::device::{Arch, SmResources};
use crate::error::{Error, Result};
use crate::variant::{self, VariantSpec};

/// What to compile: a selection of variants, head dims, element types and archs (every one of
/// each by default), plus the serving ops' kernels.
///
/// ```
/// use ferrinfer_runtime::jit::Precompile;
/// use ferrinfer_runtime::{Arch, DType};
///
/// let what = Precompile::all()
///     .head_dims(&[128])
///     .dtypes(&[DType::Bf16])
///     .archs(&[Arch::new(9, 0)]);
/// // Nothing is compiled until `ferrinfer_runtime::precompile(&jit, &what, ...)`.
/// assert!(what.jobs().is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct Precompile {
    variants: Option<Vec<String>>,
    head_dims: Option<Vec<u32>>,
    dtypes: Option<Vec<DType>>,
    archs: Vec<(Arch, SmResources)>,
    ops: bool,
    one_per_family: bool,
}

impl Precompile {
    /// Every registered variant, head dim and element type, for sm_80 and sm_90a (each with its
    /// typical SM, which decides the wide-K/V-tile instances), and every op kernel.
    pub fn all() -> Precompile {
        Precompile {
            variants: None,
            head_dims: None,
            dtypes: None,
            archs: [Arch::SM80, Arch::new(9, 0)]
                .map(|a| (a, SmResources::typical(a)))
                .into(),
            ops: true,
            one_per_family: false,
        }
    }

    /// Only these variants, by type name or qualified name (`SoftCap`, `my_crate::MyVariant`).
    pub fn variants(mut self, names: &[&str]) -> Precompile {
        self.variants = Some(names.iter().map(|n| n.to_string()).collect());
        self
    }

    /// Only these head dims.
    pub fn head_dims(mut self, dims: &[u32]) -> Precompile {
        self.head_dims = Some(dims.to_vec());
        self
    }

    /// Only these element types.
    pub fn dtypes(mut self, dtypes: &[DType]) -> Precompile {
        self.dtypes = Some(dtypes.to_vec());
        self
    }

    /// For these archs, each with its typical SM.
    pub fn archs(mut self, archs: &[Arch]) -> Precompile {
        self.archs = archs
            .iter()
            .map(|&a| (a, SmResources::typical(a)))
            .collect();
        self
    }

    /// For one GPU: its arch and its SM's resources (from `Gpu::arch` and `Gpu::sm_resources`),
    /// which decide exactly the instances the runtime will try there.
    pub fn for_gpu(mut self, arch: Arch, sm: SmResources) -> Precompile {
        self.archs = vec![(arch, sm)];
        self
    }

    /// Whether to include the serving ops' kernels (on by default).
    pub fn ops(mut self, ops: bool) -> Precompile {
        self.ops = ops;
        self
    }

    /// Keep only the first selected instance of each kernel family (and of each op) per variant
    /// and arch: a quick check that a toolkit compiles every kind of kernel.
    pub fn one_per_family(mut self, one: bool) -> Precompile {
        self.one_per_family = one;
        self
    }

    /// The kernels to compile, each with its arch and a readable name
    /// (`SoftCap prefill_hd128_bf16...`). Fails when a named variant is not registered.
    pub fn jobs(&self) -> Result<Vec<Job>> {
        let specs: Vec<&'static VariantSpec> = match &self.variants {
            None => variant::registered().collect(),
            Some(names) => {
                let mut specs = Vec::new();
                for name in names {
                    let found = variant::find(name);
                    if found.is_empty() {
                        let known: Vec<String> =
                            variant::registered().map(|s| s.qualified_name()).collect();
                        return Err(Error::invalid(format!(
                            "variants: {name:?} is not a registered variant; expected one of {}",
                            known.join(", ")
                        )));
                    }
                    specs.extend(found);
                }
                specs
            }
        };
        let keep = |cfg: &KernelConfig| {
            self.head_dims
                .as_ref()
                .is_none_or(|d| d.contains(&cfg.head_dim_qk))
                && self.dtypes.as_ref().is_none_or(|d| d.contains(&cfg.dtype))
        };
        let mut jobs = Vec::new();
        for &(arch, sm) in &self.archs {
            for spec in &specs {
                let mut families = Vec::new();
                for cfg in dispatch::instances_for(spec, arch, &sm)
                    .into_iter()
                    .filter(keep)
                {
                    if self.one_per_family {
                        if families.contains(&cfg.kind) {
                            continue;
                        }
                        families.push(cfg.kind);
                    }
                    // Each consumers' loop the runtime may pick for it (FA3 at head dim 128: also
                    // in order, for caches whose K/V go through cp.async).
                    for lp in dispatch::loops(&cfg) {
                        let form = match lp {
                            Sm90Loop::Default => "",
                            Sm90Loop::InOrder => " in order",
                        };
                        jobs.push(Job {
                            name: format!("{} {}{form}", spec.name, cfg.name()),
                            kernel: Kernel::Attention(spec, cfg, lp),
                            arch,
                        });
                        if self.one_per_family {
                            break;
                        }
                    }
                }
            }
            if self.ops {
                let mut seen_ops: Vec<String> = Vec::new();
                for tu in crate::ops::units()? {
                    // An op's instances share the name up to their last `_` part.
                    let op = tu.name.rsplit_once('_').map_or(&*tu.name, |(a, _)| a);
                    if self.one_per_family {
                        if seen_ops.iter().any(|s| s == op) {
                            continue;
                        }
                        seen_ops.push(op.to_string());
                    }
                    jobs.push(Job {
                        name: tu.name.clone(),
                        kernel: Kernel::Op(tu),
                        arch,
                    });
                }
            }
        }
        Ok(jobs)
    }
}

/// One kernel to compile.
#[derive(Clone, Debug)]
pub struct Job {
    /// A readable name: the variant and instance, or the op kernel.
    pub name: String,
    /// The kernel.
    pub kernel: Kernel,
    /// The arch to compile for.
    pub arch: Arch,
}

/// An attention instance of a variant, or an op's translation unit.
#[derive(Clone, Debug)]
pub enum Kernel {
    /// A variant compiled into one attention kernel instance, with the FA3 consumers' loop
    /// (ignored by other instances).
    Attention(&'static VariantSpec, KernelConfig, Sm90Loop),
    /// A serving op's kernel.
    Op(TranslationUnit),
}

impl Job {
    /// Compile it (or find it in a cache) with `jit`.
    pub fn compile(&self, jit: &Jit) -> Result<std::sync::Arc<super::CompiledKernel>> {
        match &self.kernel {
            Kernel::Attention(spec, cfg, lp) => {
                dispatch::compile_loop_with(jit, spec, cfg, *lp, self.arch)
            }
            Kernel::Op(tu) => jit.compile(tu, self.arch),
        }
    }
}

/// What [`precompile`] did.
#[derive(Clone, Debug, Default)]
pub struct PrecompileReport {
    /// Kernels compiled by NVRTC now.
    pub compiled: usize,
    /// Kernels that were already in the disk cache.
    pub cached: usize,
    /// Kernels that failed: (job name and arch, error).
    pub failed: Vec<(String, String)>,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The cache directory filled, if any.
    pub cache_dir: Option<std::path::PathBuf>,
}

impl PrecompileReport {
    /// Whether every kernel is now in the cache.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

impl fmt::Display for PrecompileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} kernels compiled, {} already cached, {} failed in {:.1} s",
            self.compiled,
            self.cached,
            self.failed.len(),
            self.seconds
        )?;
        if let Some(dir) = &self.cache_dir {
            write!(f, "; cache {}", dir.display())?;
        }
        for (what, why) in &self.failed {
            write!(f, "\nfailed: {what}: {why}")?;
        }
        Ok(())
    }
}

/// Compile every job of `what` into `jit`'s disk cache on all cores, calling `progress(done,
/// total, name)` after each kernel (from worker threads). Kernels already cached are counted, not
/// recompiled. Fails up front when `jit` may not compile (`FERRINFER_NO_JIT`) or has no writable
/// disk cache (compiling into memory only would be lost); a kernel that fails is reported in
/// [`PrecompileReport::failed`] and the others go on.
///
/// ```no_run
/// use ferrinfer_runtime::jit::{Jit, JitConfig};
/// use ferrinfer_runtime::{Arch, DType, Precompile};
///
/// let jit = Jit::new(JitConfig {
///     cache_dir: Some("/srv/kernels".into()),
///     ..JitConfig::default()
/// });
/// let what = Precompile::all()
///     .archs(&[Arch::SM90])
///     .head_dims(&[128])
///     .dtypes(&[DType::Bf16]);
/// let report = ferrinfer_runtime::precompile(&jit, &what, |done, total, name| {
///     eprintln!("{done}/{total} {name}")
/// })?;
/// println!("{report}");
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
pub fn precompile(
    jit: &Jit,
    what: &Precompile,
    progress: impl Fn(usize, usize, &str) + Sync,
) -> Result<PrecompileReport> {
    if !jit.config().compile {
        return Err(Error::invalid(
            "jit: compiling is off (FERRINFER_NO_JIT is set); precompiling needs it on",
        ));
    }
    let Some(dir) = jit.cache_dir() else {
        return Err(Error::invalid(
            "jit: no usable disk cache directory; set FERRINFER_CACHE_DIR (or JitConfig::cache_dir) \
             to where the kernels should go",
        ));
    };
    if let Some(why) = jit.cache_read_only() {
        return Err(Error::invalid(format!(
            "jit: the kernel cache {} is read-only ({why})",
            dir.display()
        )));
    }
    let jobs = what.jobs()?;
    let start = Instant::now();
    let done = AtomicUsize::new(0);
    let results = crate::parallel::map(&jobs, usize::MAX, |job| {
        let r = job.compile(jit);
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        progress(n, jobs.len(), &job.name);
        r
    });
    let mut report = PrecompileReport {
        cache_dir: Some(dir.to_path_buf()),
        ..PrecompileReport::default()
    };
    for (job, r) in jobs.iter().zip(results) {
        match r {
            Ok(k) if k.origin == Origin::Compiled => report.compiled += 1,
            Ok(_) => report.cached += 1,
            Err(e) => report
                .failed
                .push((format!("{} {}", job.name, job.arch), e.to_string())),
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
