//! `ferrinfer::precompile`: fills a cache that a no-JIT process then serves; its refusals. Needs
//! NVRTC (as every CI test run has), no GPU.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferrinfer::jit::{Jit, JitConfig};
use ferrinfer::{Arch, DType, Error, Precompile};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ferrinfer-precompile-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn jit(dir: &std::path::Path, compile: bool) -> Jit {
    Jit::new(JitConfig {
        cache_dir: Some(dir.to_path_buf()),
        compile,
        extra_options: Vec::new(),
    })
    .with_announce(false)
}

/// Standard at head dim 64, f16, sm_80: one prefill and one decode instance, and one of each op.
fn small() -> Precompile {
    Precompile::all()
        .variants(&["Standard"])
        .head_dims(&[64])
        .dtypes(&[DType::F16])
        .archs(&[Arch::SM80])
        .one_per_family(true)
}

#[test]
fn fills_a_cache_that_a_no_jit_process_serves() {
    let dir = temp_dir("fill");
    let what = small();
    let jobs = what.jobs().unwrap();
    let attention: Vec<&str> = jobs
        .iter()
        .map(|j| j.name.as_str())
        .filter(|n| n.starts_with("Standard "))
        .collect();
    assert_eq!(attention.len(), 2, "one instance per family: {attention:?}");
    assert!(
        attention[0].starts_with("Standard prefill_hd64_f16"),
        "{attention:?}"
    );
    assert!(
        attention[1].starts_with("Standard decode_hd64_f16"),
        "{attention:?}"
    );
    assert!(jobs.len() > attention.len(), "the ops are included");
    assert!(jobs.iter().all(|j| j.arch == Arch::SM80));

    let calls = AtomicUsize::new(0);
    let report = ferrinfer::precompile(&jit(&dir, true), &what, |done, total, _| {
        assert!(done <= total && total == jobs.len());
        calls.fetch_add(1, Ordering::Relaxed);
    })
    .unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(
        (report.compiled, report.cached),
        (jobs.len(), 0),
        "{report}"
    );
    assert_eq!(calls.load(Ordering::Relaxed), jobs.len());
    assert!(
        report
            .to_string()
            .contains(&format!("{} kernels compiled", jobs.len()))
    );

    // Again: everything is already there.
    let again = ferrinfer::precompile(&jit(&dir, true), &what, |_, _, _| {}).unwrap();
    assert_eq!((again.compiled, again.cached), (0, jobs.len()), "{again}");

    // What a FERRINFER_NO_JIT server asks for is all served from disk.
    let serving = jit(&dir, false);
    for job in &jobs {
        let k = job
            .compile(&serving)
            .unwrap_or_else(|e| panic!("{}: {e}", job.name));
        assert_eq!(k.origin, ferrinfer::jit::Origin::Disk);
    }
    // ...and something else is a clear miss.
    let other = Precompile::all()
        .variants(&["SoftCap"])
        .head_dims(&[64])
        .dtypes(&[DType::F16])
        .archs(&[Arch::SM80])
        .ops(false)
        .one_per_family(true);
    let miss = other.jobs().unwrap()[0].compile(&serving).unwrap_err();
    assert!(matches!(miss, Error::CacheMiss(_)), "{miss}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_what_cannot_work_and_names_it() {
    let dir = temp_dir("refuse");
    let no_jit = ferrinfer::precompile(&jit(&dir, false), &small(), |_, _, _| {}).unwrap_err();
    assert!(no_jit.to_string().contains("FERRINFER_NO_JIT"), "{no_jit}");

    let memory_only = Jit::new(JitConfig::default());
    let no_dir = ferrinfer::precompile(&memory_only, &small(), |_, _, _| {}).unwrap_err();
    assert!(
        no_dir.to_string().contains("FERRINFER_CACHE_DIR"),
        "{no_dir}"
    );

    let unknown = Precompile::all()
        .variants(&["NoSuchVariant"])
        .jobs()
        .unwrap_err();
    let msg = unknown.to_string();
    assert!(
        msg.contains("NoSuchVariant") && msg.contains("Standard"),
        "names the bad value and what exists: {msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// On Hopper the FA3 instance at head dim 128 is precompiled with its consumers in order as well
/// (what a launch whose K/V go through cp.async runs, e.g. over pages of 16), as a build of its
/// own; head dims 64 and 256 have one build.
#[test]
fn hopper_gets_the_in_order_fa3_build_at_head_dim_128() {
    let jobs = |hd| {
        Precompile::all()
            .variants(&["Standard"])
            .head_dims(&[hd])
            .dtypes(&[DType::Bf16])
            .archs(&[Arch::SM90])
            .ops(false)
            .jobs()
            .unwrap()
    };
    let fa3 = "Standard prefill_hd128_bf16_q128_k128_sm90a";
    let in_order = format!("{fa3} in order");
    let at_128 = jobs(128);
    let find = |name: &str| {
        at_128
            .iter()
            .find(|j| j.name == name)
            .unwrap_or_else(|| panic!("no job {name}"))
    };
    for hd in [64, 256] {
        assert!(
            !jobs(hd).iter().any(|j| j.name.ends_with(" in order")),
            "head dim {hd}"
        );
    }
    let dir = temp_dir("in-order");
    let jit = jit(&dir, true);
    let (overlap, in_order) = (
        find(fa3).compile(&jit).unwrap(),
        find(&in_order).compile(&jit).unwrap(),
    );
    assert_eq!(
        (overlap.origin, in_order.origin),
        (
            ferrinfer::jit::Origin::Compiled,
            ferrinfer::jit::Origin::Compiled
        ),
        "two builds, neither a cache hit of the other"
    );
    assert_ne!(overlap.cubin, in_order.cubin);
    assert_eq!(overlap.entry, in_order.entry);
    assert_eq!(in_order.stats.spill_stores + in_order.stats.spill_loads, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
