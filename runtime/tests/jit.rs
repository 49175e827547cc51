//! The JIT on a machine without a GPU: NVRTC (from pip, via CUDA_HOME) must be present; these tests
//! fail, never skip, when it is not.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex, Once};

use ferrinfer_kernels::TranslationUnit;
use ferrinfer_runtime::device::toolkit;
use ferrinfer_runtime::error::Error;
use ferrinfer_runtime::jit::cache::{self, Entry};
use ferrinfer_runtime::jit::{Arch, CompiledKernel, Jit, JitConfig, KernelStats, Origin};

/// A kernel with enough work that ptxas reports registers and static shared memory.
fn saxpy_tu(tag: &str) -> TranslationUnit {
    TranslationUnit {
        name: format!("saxpy_{tag}"),
        source: format!(
            r#"// {tag}
extern "C" __global__ void saxpy_tanh(float a, const float* x, float* y, int n) {{
    __shared__ float tile[128];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? x[i] : 0.f;
    __syncthreads();
    if (i < n) y[i] = tanhf(a * tile[(threadIdx.x + 1) % 128] + y[i]) * expf(-y[i]);
}}
"#
        ),
        entry: "saxpy_tanh".into(),
        merge_entry: None,
    }
}

/// A fresh, empty directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrinfer-jit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn disk_jit(dir: &Path, compile: bool) -> Jit {
    Jit::new(JitConfig {
        cache_dir: Some(dir.to_path_buf()),
        compile,
        extra_options: Vec::new(),
    })
}

fn memory_jit() -> Jit {
    Jit::new(JitConfig::default())
}

fn assert_cubin(k: &CompiledKernel) {
    assert_eq!(&k.cubin[..4], b"\x7fELF", "a CUBIN is an ELF image");
    assert_eq!(k.entry, "saxpy_tanh");
    assert!(k.stats.registers > 0, "stats parsed from {:?}", k.log);
    assert_eq!(
        k.stats.shared_static, 512,
        "128 floats of static shared memory"
    );
}

#[test]
fn compiles_for_sm80_and_sm90a_and_hits_memory() {
    let jit = memory_jit();
    let tu = saxpy_tu("archs");
    for arch in [Arch::new(8, 0), Arch::new(9, 0)] {
        let first = jit.compile(&tu, arch).unwrap();
        assert_eq!(first.origin, Origin::Compiled);
        assert!(first.seconds > 0.0);
        assert!(
            first.log.contains(&arch.sm_name()),
            "ptxas log names {arch}: {}",
            first.log
        );
        assert_cubin(&first);
        let second = jit.compile(&tu, arch).unwrap();
        assert_eq!(second.origin, Origin::Memory);
        assert_eq!(second.cubin, first.cubin);
        assert_eq!(second.stats, first.stats);
    }
    assert_eq!(jit.cache_dir(), None);
}

#[test]
fn sm90a_accepts_hopper_only_instructions() {
    let tu = TranslationUnit {
        name: "setmaxnreg".into(),
        source: r#"extern "C" __global__ void __launch_bounds__(128) grow(float* x) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    x[threadIdx.x] += 1.f;
}
"#
        .into(),
        entry: "grow".into(),
        merge_entry: None,
    };
    let k = memory_jit().compile(&tu, Arch::SM90).unwrap();
    assert_eq!(k.origin, Origin::Compiled);
    assert!(matches!(
        memory_jit().compile(&tu, Arch::SM80),
        Err(Error::Compile { .. })
    ));
}

/// The sm_90a vocabulary (kernels/cuda/sm90/: mbarriers, named barriers, TMA and bulk loads,
/// wgmma from shared memory and from registers, warpgroup register budgets) passes NVRTC and
/// ptxas for sm_90a, every form instantiated once, and is refused for sm_80. The FA3 template is
/// built from these (its instances compile in tests/check_variant.rs).
#[test]
fn the_sm90_vocabulary_compiles_for_sm90a_only() {
    let units = [
        (
            "sm90/tma.cuh",
            128,
            "fi::TensorMap*",
            r#"__shared__ alignas(1024) unsigned short tile[64 * 64];
  __shared__ alignas(8) unsigned long long bar;
  if (threadIdx.x == 0) {
    fi::mbar_init(&bar, 1);
    fi::mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    fi::tma_prefetch(args);
    fi::mbar_arrive_expect_tx(&bar, 3 * 8192 + 256);
    fi::tma_load_2d(tile, args, &bar, 0, 64);
    fi::tma_load_3d(tile, args + 1, &bar, 0, 64, 1);
    fi::tma_load_4d(tile, args + 2, &bar, 0, 64, 1, 2);
    fi::bulk_load(tile + 4096, args + 3, 256, &bar);
  }
  fi::mbar_wait(&bar, 0);
  fi::named_sync(1, 128);
  tile[threadIdx.x] += 1;
  fi::fence_proxy_async();
  fi::named_arrive(2, 128);
  if (threadIdx.x == 0) fi::mbar_arrive(&bar);"#,
        ),
        (
            "sm90/wgmma.cuh",
            128,
            "unsigned long long",
            r#"__shared__ alignas(1024) unsigned short a_tile[64 * 16], b_tile[128 * 16];
  float d[64];
  for (int i = 0; i < 64; ++i) d[i] = 0.0f;
  const unsigned long long da = fi::wgmma_desc(a_tile, 128, 256, 0);
  const unsigned long long db = fi::wgmma_desc(b_tile, 128, 256, 1);
  const unsigned a[4] = {threadIdx.x, 1u, 2u, 3u};
  fi::wgmma_fence();
  fi::wgmma_ss_64x128x16<true, 0>(d, da, db, false);
  fi::wgmma_ss_64x128x16<false, 1>(d, da, db, true);
  fi::wgmma_rs_64x128x16<true, 1>(d, a, db, true);
  fi::wgmma_rs_64x128x16<false, 0>(d, a, db, true);
  // The n64 units, into each half of d (the accumulator of columns 0-63, then 64-127).
  fi::wgmma_ss_64x64x16<true, 0>(fi::wgmma_cols<0, 32>(d), da, db, true);
  fi::wgmma_ss_64x64x16<false, 1>(fi::wgmma_cols<32, 32>(d), da, db, true);
  fi::wgmma_rs_64x64x16<true, 1>(fi::wgmma_cols<0, 32>(d), a, db, true);
  fi::wgmma_rs_64x64x16<false, 0>(fi::wgmma_cols<32, 32>(d), a, db, true);
  fi::wgmma_commit();
  fi::wgmma_wait<0>();
  fi::wgmma_hold(d);
  float* out = reinterpret_cast<float*>(args);
  for (int i = 0; i < 64; ++i) out[threadIdx.x * 64 + i] = d[i];"#,
        ),
        (
            "sm90/warpgroup.cuh",
            384,
            "unsigned long long",
            r#"if (fi::warpgroup_id() == 0) {
    fi::regs_shrink<40>();
  } else {
    fi::regs_grow<232>();
  }
  reinterpret_cast<unsigned*>(args)[threadIdx.x] = fi::warpgroup_thread();"#,
        ),
    ];
    for (header, threads, args, body) in units {
        let name = header.replace(['/', '.'], "_");
        let tu = ferrinfer_kernels::ops::op_unit(&name, header, threads, args, body).unwrap();
        let k = memory_jit()
            .compile(&tu, Arch::SM90)
            .unwrap_or_else(|e| panic!("{header} for sm_90a: {e}"));
        assert!(k.stats.registers > 0, "{header}: no ptxas report");
        assert!(
            matches!(
                memory_jit().compile(&tu, Arch::SM80),
                Err(Error::Compile { .. })
            ),
            "{header} compiled for sm_80"
        );
    }
}

#[test]
fn a_new_jit_on_the_same_dir_hits_disk() {
    let dir = temp_dir("disk");
    let tu = saxpy_tu("disk");
    let compiled = disk_jit(&dir, true).compile(&tu, Arch::SM80).unwrap();
    assert_eq!(compiled.origin, Origin::Compiled);
    let jit = disk_jit(&dir, true);
    assert_eq!(jit.cache_dir(), Some(dir.as_path()));
    let path = jit.entry_path(&tu, Arch::SM80).unwrap().unwrap();
    assert!(path.is_file() && path.starts_with(&dir) && path.extension().unwrap() == "cubin");
    let loaded = jit.compile(&tu, Arch::SM80).unwrap();
    assert_eq!(loaded.origin, Origin::Disk);
    assert_eq!(loaded.cubin, compiled.cubin);
    assert_eq!(loaded.stats, compiled.stats);
    assert_eq!(loaded.log, compiled.log);
    assert_eq!(jit.compile(&tu, Arch::SM80).unwrap().origin, Origin::Memory);
    // Another arch is another entry.
    assert_eq!(
        jit.compile(&tu, Arch::SM90).unwrap().origin,
        Origin::Compiled
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_entries_are_recompiled_and_repaired() {
    let dir = temp_dir("corrupt");
    let tu = saxpy_tu("corrupt");
    let other = saxpy_tu("other");
    let good = disk_jit(&dir, true).compile(&tu, Arch::SM80).unwrap();
    disk_jit(&dir, true).compile(&other, Arch::SM80).unwrap();
    let path = disk_jit(&dir, true)
        .entry_path(&tu, Arch::SM80)
        .unwrap()
        .unwrap();
    let other_path = disk_jit(&dir, true)
        .entry_path(&other, Arch::SM80)
        .unwrap()
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // (The log, and so the file, differs between compiles: ptxas reports its own compile time.)
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 0x40;
    let corruptions: [(&str, Vec<u8>); 5] = [
        ("garbage", b"this is not a cubin at all".to_vec()),
        ("empty", Vec::new()),
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("flipped payload byte", flipped),
        (
            "another kernel's entry",
            std::fs::read(&other_path).unwrap(),
        ),
    ];
    for (what, corrupt) in corruptions {
        std::fs::write(&path, corrupt).unwrap();
        let k = disk_jit(&dir, true).compile(&tu, Arch::SM80).unwrap();
        assert_eq!(k.origin, Origin::Compiled, "{what} must not be trusted");
        assert_eq!(k.cubin, good.cubin);
        let again = disk_jit(&dir, true).compile(&tu, Arch::SM80).unwrap();
        assert_eq!(again.origin, Origin::Disk, "{what} was repaired");
        assert!(
            again.cubin == good.cubin,
            "{what}: the rewritten entry holds the right CUBIN"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_jit_mode_fails_on_a_miss_and_serves_hits() {
    let dir = temp_dir("nojit");
    let tu = saxpy_tu("nojit");
    match disk_jit(&dir, false).compile(&tu, Arch::SM80) {
        Err(Error::CacheMiss(msg)) => {
            assert!(msg.contains(&tu.name) && msg.contains("sm_80"), "{msg}")
        }
        other => panic!("expected CacheMiss, got {:?}", other.map(|k| k.origin)),
    }
    let memory_only = Jit::new(JitConfig {
        compile: false,
        ..JitConfig::default()
    });
    assert!(matches!(
        memory_only.compile(&tu, Arch::SM80),
        Err(Error::CacheMiss(_))
    ));
    let compiled = disk_jit(&dir, true).compile(&tu, Arch::SM80).unwrap();
    let served = disk_jit(&dir, false).compile(&tu, Arch::SM80).unwrap();
    assert_eq!(served.origin, Origin::Disk);
    assert_eq!(served.cubin, compiled.cubin);
    // A different arch is still a miss.
    assert!(matches!(
        disk_jit(&dir, false).compile(&tu, Arch::SM90),
        Err(Error::CacheMiss(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn concurrent_jits_sharing_a_dir_agree() {
    let dir = temp_dir("threads");
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (dir, barrier) = (dir.clone(), barrier.clone());
            std::thread::spawn(move || {
                let jit = disk_jit(&dir, true);
                barrier.wait();
                jit.compile(&saxpy_tu("threads"), Arch::SM90)
                    .unwrap()
                    .cubin
                    .clone()
            })
        })
        .collect();
    let cubins: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(cubins.iter().all(|c| *c == cubins[0]));
    let after = disk_jit(&dir, true)
        .compile(&saxpy_tu("threads"), Arch::SM90)
        .unwrap();
    assert_eq!(after.origin, Origin::Disk);
    assert_eq!(after.cubin, cubins[0]);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_jit_shared_by_threads_compiles_once() {
    let jit = Arc::new(memory_jit());
    let tu = Arc::new(saxpy_tu("shared"));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (jit, tu) = (jit.clone(), tu.clone());
            std::thread::spawn(move || jit.compile(&tu, Arch::SM80).unwrap().origin)
        })
        .collect();
    let origins: Vec<Origin> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        origins.iter().filter(|o| **o == Origin::Compiled).count(),
        1,
        "{origins:?}"
    );
}

#[test]
fn a_syntax_error_gives_the_log_and_the_line() {
    let tu = TranslationUnit {
        name: "broken_tu".into(),
        source: "// line 1\n// line 2\nextern \"C\" __global__ void k(float* x) {\n    x[0] = undefined_name;\n}\n".into(),
        entry: "k".into(),
        merge_entry: None,
    };
    match memory_jit().compile(&tu, Arch::SM80) {
        Err(Error::Compile { kernel, log }) => {
            assert_eq!(kernel, "broken_tu");
            assert!(
                log.contains("undefined_name") && log.contains("error"),
                "{log}"
            );
            assert!(log.contains("broken_tu(4)"), "NVRTC names the line: {log}");
            assert!(
                log.contains(">    4 |     x[0] = undefined_name;"),
                "context shown: {log}"
            );
        }
        other => panic!("expected Error::Compile, got {:?}", other.map(|k| k.origin)),
    }
}

#[test]
fn extra_options_are_used_and_keyed() {
    let dir = temp_dir("options");
    let tu = TranslationUnit {
        name: "defined".into(),
        source: "#ifndef SCALE\n#error SCALE must be defined\n#endif\nextern \"C\" __global__ void k(float* x) { x[0] *= SCALE; }\n"
            .into(),
        entry: "k".into(),
        merge_entry: None,
    };
    let with = |opts: &[&str]| {
        Jit::new(JitConfig {
            cache_dir: Some(dir.clone()),
            compile: true,
            extra_options: opts.iter().map(|s| s.to_string()).collect(),
        })
    };
    assert!(matches!(
        with(&[]).compile(&tu, Arch::SM80),
        Err(Error::Compile { .. })
    ));
    let two = with(&["-DSCALE=2.f"]);
    assert_eq!(
        two.compile(&tu, Arch::SM80).unwrap().origin,
        Origin::Compiled
    );
    let three = with(&["-DSCALE=3.f"]);
    assert_ne!(
        two.entry_path(&tu, Arch::SM80).unwrap(),
        three.entry_path(&tu, Arch::SM80).unwrap()
    );
    assert_eq!(
        three.compile(&tu, Arch::SM80).unwrap().origin,
        Origin::Compiled
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unusable_cache_dir_falls_back_to_memory() {
    let dir = temp_dir("unwritable");
    let file = dir.join("a_file");
    std::fs::write(&file, b"x").unwrap();
    let jit = disk_jit(&file.join("cache"), true);
    assert_eq!(jit.cache_dir(), None);
    let tu = saxpy_tu("unwritable");
    assert_eq!(
        jit.compile(&tu, Arch::SM80).unwrap().origin,
        Origin::Compiled
    );
    assert_eq!(jit.compile(&tu, Arch::SM80).unwrap().origin, Origin::Memory);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every log record of this test binary, as "LEVEL message"; the logger is installed on first use.
fn logged() -> Vec<String> {
    struct Capture(Mutex<Vec<String>>);
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            let line = format!("{} {}", record.level(), record.args());
            self.0.lock().unwrap().push(line);
        }
        fn flush(&self) {}
    }
    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&CAPTURE).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
    CAPTURE.0.lock().unwrap().clone()
}

/// The logged lines that mention `path` and `what`.
fn logged_about(path: &Path, what: &str) -> Vec<String> {
    let path = path.display().to_string();
    logged()
        .into_iter()
        .filter(|l| l.contains(&path) && l.contains(what))
        .collect()
}

/// The kernels a deployment precompiled into its read-only cache.
fn deployed_kernels() -> Vec<(TranslationUnit, Arch)> {
    let mut all = Vec::new();
    for tag in ["deployed_a", "deployed_b"] {
        for arch in [Arch::SM80, Arch::SM90] {
            all.push((saxpy_tu(tag), arch));
        }
    }
    all
}

/// Names (and sizes) of the files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut names: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (name, e.metadata().unwrap().len())
        })
        .collect();
    names.sort();
    names
}

/// chmod the directory and its files: read-only (0o555 / 0o444) or back to 0o755 / 0o644.
fn set_read_only(dir: &Path, read_only: bool) {
    use std::os::unix::fs::PermissionsExt;
    let (d, f) = if read_only {
        (0o555, 0o444)
    } else {
        (0o755, 0o644)
    };
    if !read_only {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(d)).unwrap();
    }
    for e in std::fs::read_dir(dir).unwrap() {
        std::fs::set_permissions(e.unwrap().path(), std::fs::Permissions::from_mode(f)).unwrap();
    }
    if read_only {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(d)).unwrap();
    }
}

/// Whether this process can create a file in `dir` (root can, whatever the permission bits).
fn can_write_in(dir: &Path) -> bool {
    let probe = dir.join(".can-this-user-write");
    let ok = std::fs::File::create(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Set, in a child run of this test binary, to the read-only cache directory it must serve from.
const READ_ONLY_CACHE_VAR: &str = "FERRINFER_TEST_READ_ONLY_CACHE";
/// "nobody": a user the permission bits apply to.
const UNPRIVILEGED: u32 = 65534;

/// What a deployment does: serve every precompiled kernel from a cache it cannot write.
fn serve_from_read_only_cache(dir: &Path) {
    logged(); // install the logger before the Jits below log
    let before = listing(dir);
    let jit = disk_jit(dir, false);
    assert_eq!(
        jit.cache_dir(),
        Some(dir),
        "a read-only cache is still used"
    );
    assert!(jit.cache_read_only().is_some());
    for (tu, arch) in deployed_kernels() {
        let k = jit
            .compile(&tu, arch)
            .unwrap_or_else(|e| panic!("{} for {arch} from a read-only cache: {e}", tu.name));
        assert_eq!(k.origin, Origin::Disk, "{} for {arch}", tu.name);
        assert_cubin(&k);
    }
    // With JIT on, hits still come from disk, and a new kernel compiles and stays in memory.
    let jit = disk_jit(dir, true);
    let (tu, arch) = &deployed_kernels()[0];
    assert_eq!(jit.compile(tu, *arch).unwrap().origin, Origin::Disk);
    let new = saxpy_tu("not_deployed");
    assert_eq!(
        jit.compile(&new, Arch::SM80).unwrap().origin,
        Origin::Compiled
    );
    assert_eq!(
        jit.compile(&new, Arch::SM80).unwrap().origin,
        Origin::Memory
    );
    assert_eq!(listing(dir), before, "nothing was written");
    // Said once per Jit, not once per kernel; no store was attempted.
    let said = logged_about(dir, "is read-only");
    assert_eq!(said.len(), 2, "once for each of the two Jits: {said:?}");
    assert!(
        said[0].starts_with("INFO") && said[1].starts_with("WARN"),
        "{said:?}"
    );
    let tried = logged_about(dir, "could not write");
    assert!(tried.is_empty(), "stores are skipped: {tried:?}");
}

#[test]
fn no_jit_serves_every_kernel_from_a_read_only_cache() {
    if let Some(dir) = std::env::var_os(READ_ONLY_CACHE_VAR) {
        // The unprivileged child started below.
        serve_from_read_only_cache(Path::new(&dir));
        return;
    }
    let dir = temp_dir("read_only");
    let filler = disk_jit(&dir, true);
    for (tu, arch) in deployed_kernels() {
        assert_eq!(filler.compile(&tu, arch).unwrap().origin, Origin::Compiled);
    }
    set_read_only(&dir, true);
    if can_write_in(&dir) {
        // Root: permission bits do not stop it. Run the check again as a user they do stop.
        use std::os::unix::process::CommandExt;
        let name = "no_jit_serves_every_kernel_from_a_read_only_cache";
        let (exe, cuda_home) = stage_for_unprivileged();
        let mut child = std::process::Command::new(&exe);
        if let Some(home) = &cuda_home {
            child.env("CUDA_HOME", home).env_remove("CUDA_PATH");
        }
        let out = child
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(READ_ONLY_CACHE_VAR, &dir)
            .uid(UNPRIVILEGED)
            .gid(UNPRIVILEGED)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "permission bits do not stop this user, and running this test again as uid \
                     {UNPRIVILEGED} failed: {e}"
                )
            });
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(exe.parent().unwrap());
        assert!(
            out.status.success() && text.contains("1 passed"),
            "as uid {UNPRIVILEGED}: {text}"
        );
    } else {
        serve_from_read_only_cache(&dir);
    }
    set_read_only(&dir, false);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of this test binary, and of the NVRTC libraries this process loaded, where
/// `UNPRIVILEGED` can reach them whatever folder the checkout is in (a CI running as root may clone
/// under /root, which no other user may enter). Returns the binary and, when NVRTC came from a
/// CUDA root rather than the system loader, the copied root for the child's `CUDA_HOME`.
fn stage_for_unprivileged() -> (PathBuf, Option<PathBuf>) {
    let stage = temp_dir("unprivileged");
    let exe = stage.join("jit-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let home = toolkit::cuda_root().map(|root| {
        let lib = ["lib64", "lib", "targets/x86_64-linux/lib"]
            .map(|d| root.join(d))
            .into_iter()
            .find(|d| has_nvrtc(d))
            .expect("NVRTC was loaded from this root");
        let to = stage.join("cuda/lib64");
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&lib).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            // NVRTC and its builtins; the `.alt` builds are not loaded.
            if name.starts_with("libnvrtc") && !name.contains(".alt.") {
                std::fs::copy(&path, to.join(&name)).unwrap();
            }
        }
        stage.join("cuda")
    });
    (exe, home)
}

fn has_nvrtc(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|es| {
        es.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libnvrtc.so"))
    })
}

/// The `Error::CacheMiss` message of `jit` for `tu` on sm_80.
fn miss_message(jit: &Jit, tu: &TranslationUnit) -> String {
    match jit.compile(tu, Arch::SM80) {
        Err(Error::CacheMiss(msg)) => msg,
        other => panic!("expected CacheMiss, got {:?}", other.map(|k| k.origin)),
    }
}

/// A miss says what was looked for (kernel, arch, key, file), why it missed, and the fix.
fn assert_explains(msg: &str, tu: &TranslationUnit, path: Option<&Path>, why: &str) {
    let key = path.map(|p| p.file_stem().unwrap().to_string_lossy().into_owned());
    let path = path.map(|p| p.display().to_string());
    let parts = [
        Some(tu.name.as_str()),
        Some("sm_80"),
        key.as_deref(),
        path.as_deref(),
        Some(why),
        Some("FERRINFER_NO_JIT"),
        Some("FERRINFER_CACHE_DIR"),
        Some("cargo run --release --example precompile"),
    ];
    for part in parts.into_iter().flatten() {
        assert!(msg.contains(part), "{part:?} is missing from: {msg}");
    }
}

#[test]
fn a_miss_without_jit_names_the_file_and_says_why() {
    let dir = temp_dir("miss");
    let tu = saxpy_tu("miss");
    let path = disk_jit(&dir, false)
        .entry_path(&tu, Arch::SM80)
        .unwrap()
        .unwrap();
    let file_name = path.file_name().unwrap().to_owned();
    let msg = miss_message(&disk_jit(&dir, false), &tu);
    assert_explains(&msg, &tu, Some(&path), "no such file");

    // A cache directory that does not exist and cannot be created (below a regular file: root
    // cannot create it either).
    let file = dir.join("a_file");
    std::fs::write(&file, b"x").unwrap();
    let missing = file.join("cache");
    let msg = miss_message(&disk_jit(&missing, false), &tu);
    let missing_path = missing.join(&file_name);
    assert_explains(&msg, &tu, Some(&missing_path), "does not exist");

    let no_disk = Jit::new(JitConfig {
        compile: false,
        ..JitConfig::default()
    });
    let msg = miss_message(&no_disk, &tu);
    assert_explains(&msg, &tu, None, "no disk cache is configured");

    // Another kernel's entry under this kernel's name: intact, but for another key text.
    let other = saxpy_tu("miss_other");
    disk_jit(&dir, true).compile(&other, Arch::SM80).unwrap();
    let other_path = disk_jit(&dir, true)
        .entry_path(&other, Arch::SM80)
        .unwrap()
        .unwrap();
    std::fs::copy(&other_path, &path).unwrap();
    let msg = miss_message(&disk_jit(&dir, false), &tu);
    assert_explains(&msg, &tu, Some(&path), "different key text");

    // A file of another format version.
    std::fs::remove_file(&path).unwrap();
    disk_jit(&dir, true).compile(&tu, Arch::SM80).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let msg = miss_message(&disk_jit(&dir, false), &tu);
    assert_explains(&msg, &tu, Some(&path), "another cache format version (99");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_entry_without_jit_says_corrupt() {
    let dir = temp_dir("corrupt_no_jit");
    let tu = saxpy_tu("corrupt_no_jit");
    disk_jit(&dir, true).compile(&tu, Arch::SM80).unwrap();
    let path = disk_jit(&dir, true)
        .entry_path(&tu, Arch::SM80)
        .unwrap()
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 0x40;
    let corruptions: [(&str, Vec<u8>); 4] = [
        ("bad magic", b"this is not a cubin at all".to_vec()),
        ("truncated", Vec::new()),
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("checksum mismatch", flipped),
    ];
    for (why, corrupt) in corruptions {
        std::fs::write(&path, &corrupt).unwrap();
        let msg = miss_message(&disk_jit(&dir, false), &tu);
        assert_explains(&msg, &tu, Some(&path), "corrupt");
        assert!(msg.contains(why), "{why:?} is missing from: {msg}");
        assert_eq!(std::fs::read(&path).unwrap(), corrupt, "left as it was");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_store_never_fails_a_compile() {
    logged(); // install the logger before the Jit below logs
    let dir = temp_dir("store_fails");
    let cache = dir.join("cache");
    let jit = disk_jit(&cache, true);
    assert_eq!(jit.cache_dir(), Some(cache.as_path()));
    assert_eq!(jit.cache_read_only(), None);
    // The directory becomes a regular file after the Jit opened it: every store fails, for root
    // too, as on a full disk.
    std::fs::remove_dir(&cache).unwrap();
    std::fs::write(&cache, b"not a directory").unwrap();
    for tag in ["store_fails_a", "store_fails_b"] {
        let k = jit.compile(&saxpy_tu(tag), Arch::SM80).unwrap();
        assert_eq!(k.origin, Origin::Compiled);
        assert_cubin(&k);
    }
    let warned: Vec<String> = logged_about(&cache, "could not write")
        .into_iter()
        .filter(|l| l.starts_with("WARN"))
        .collect();
    assert_eq!(warned.len(), 1, "warned once, not per kernel: {warned:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn discovery_failure_names_every_path_and_the_fix() {
    let tried = [
        PathBuf::from("/opt/cuda-x/lib64"),
        PathBuf::from("/home/u/.local/lib/python3*/site-packages/nvidia/cu13"),
    ];
    let msg = toolkit::not_found_message(&tried);
    for p in &tried {
        assert!(msg.contains(&p.display().to_string()), "{msg}");
    }
    assert!(
        msg.contains("CUDA_HOME") && msg.contains("pip install nvidia-cuda-nvrtc==13.0.88"),
        "{msg}"
    );
    let driver = toolkit::driver_not_found_message();
    for d in [
        "libcuda.so.1",
        "/usr/local/nvidia/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib/wsl/lib",
    ] {
        assert!(driver.contains(d), "{driver}");
    }
    assert!(driver.contains("no NVIDIA GPU driver"));
}

#[test]
fn nvrtc_is_found_and_the_driver_never_panics() {
    toolkit::load_nvrtc().unwrap();
    match toolkit::load_driver() {
        Ok(()) => {}
        Err(e) => assert!(e.to_string().contains("libcuda.so.1"), "{e}"),
    }
    if let Some(include) = toolkit::cuda_include_dir() {
        assert!(include.join("cuda_fp16.h").is_file());
    }
}

#[test]
fn arch_names() {
    let names: Vec<String> = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]
        .map(|(a, b)| Arch::new(a, b).sm_name())
        .into();
    assert_eq!(
        names,
        ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"]
    );
    assert_eq!(Arch::SM90.to_string(), "sm_90a");
}

#[test]
fn ptxas_report_is_parsed_for_the_entry() {
    let log = "ptxas info    : 0 bytes gmem\n\
        ptxas info    : Compiling entry function 'other' for 'sm_80'\n\
        ptxas info    : Function properties for other\n\
        ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
        ptxas info    : Used 255 registers, 4096 bytes smem, 368 bytes cmem[0]\n\
        ptxas info    : Compiling entry function 'k' for 'sm_80'\n\
        ptxas info    : Function properties for k\n\
        ptxas         .     16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n\
        ptxas info    : Used 72 registers, used 1 barriers, 1024 bytes smem\n";
    let k = KernelStats::parse(log, "k");
    assert_eq!(
        k,
        KernelStats {
            registers: 72,
            spill_stores: 12,
            spill_loads: 20,
            stack_frame: 16,
            shared_static: 1024
        }
    );
    assert_eq!(
        KernelStats::parse(log, "absent").registers,
        255,
        "unknown entry: the largest wins"
    );
}

#[test]
fn cache_entries_round_trip_and_reject_damage() {
    let e = Entry {
        key_text: "key\nsource".into(),
        entry: "k".into(),
        stats: KernelStats {
            registers: 40,
            spill_stores: 0,
            spill_loads: 0,
            stack_frame: 8,
            shared_static: 512,
        },
        nvrtc: (12, 4),
        log: "ptxas info".into(),
        cubin: (0..=255).collect(),
    };
    let bytes = cache::encode(&e);
    assert_eq!(cache::decode(&bytes, &e.key_text).unwrap(), e);
    assert!(
        cache::decode(&bytes, "another key")
            .unwrap_err()
            .to_string()
            .contains("key")
    );
    assert!(
        cache::decode(&bytes[..bytes.len() - 1], &e.key_text)
            .unwrap_err()
            .to_string()
            .contains("truncated")
    );
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(cache::decode(&longer, &e.key_text).is_err());
    let mut stats_changed = bytes.clone();
    stats_changed[8 + 4 + 4 + e.key_text.len() + 4 + 1] ^= 1;
    assert!(
        cache::decode(&stats_changed, &e.key_text)
            .unwrap_err()
            .to_string()
            .contains("checksum")
    );
}

#[test]
fn config_from_environment() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let c = JitConfig::from_lookup(env(&[
        ("FERRINFER_NO_JIT", "1"),
        ("FERRINFER_CACHE_DIR", "/c"),
        ("HOME", "/h"),
    ]));
    assert!(!c.compile);
    assert_eq!(c.cache_dir, Some(PathBuf::from("/c")));
    let c = JitConfig::from_lookup(env(&[
        ("FERRINFER_NO_JIT", "0"),
        ("XDG_CACHE_HOME", "/x"),
        ("HOME", "/h"),
    ]));
    assert!(c.compile);
    assert_eq!(c.cache_dir, Some(PathBuf::from("/x/ferrinfer")));
    let c = JitConfig::from_lookup(env(&[("HOME", "/h")]));
    assert_eq!(c.cache_dir, Some(PathBuf::from("/h/.cache/ferrinfer")));
    assert_eq!(JitConfig::from_lookup(env(&[])).cache_dir, None);
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_driver_loads_and_runs_a_jit_cubin() {
    use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
    toolkit::load_driver().unwrap();
    let ctx = CudaContext::new(0).unwrap();
    let (major, minor) = ctx.compute_capability().unwrap();
    let k = memory_jit()
        .compile(&saxpy_tu("gpu"), Arch::new(major as u32, minor as u32))
        .unwrap();
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(k.cubin.clone()))
        .unwrap();
    let f = module.load_function(&k.entry).unwrap();
    let stream = ctx.default_stream();
    let n = 256usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
    let y0: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 / n as f32).collect();
    let dx = stream.clone_htod(&x).unwrap();
    let mut dy = stream.clone_htod(&y0).unwrap();
    let (a, n_i32) = (0.5f32, n as i32);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&a).arg(&dx).arg(&mut dy).arg(&n_i32);
    // SAFETY: the argument list matches saxpy_tanh's signature and both buffers hold n floats.
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: (2, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .unwrap();
    let y = stream.clone_dtoh(&dy).unwrap();
    for i in 0..n {
        let t = (i % 128 + 1) % 128 + (i / 128) * 128;
        let want = (a * x[t] + y0[i]).tanh() * (-y0[i]).exp();
        assert!(
            (y[i] - want).abs() <= 1e-5,
            "y[{i}] = {}, want {want}",
            y[i]
        );
    }
}

/// Set, in a child run of this test binary, to the warm cache it must serve from with no NVRTC.
const NO_NVRTC_CACHE_VAR: &str = "FERRINFER_TEST_NO_NVRTC_CACHE";

/// This test binary again, running only `test` with `env` set and `CUDA_HOME`/`CUDA_PATH` unset.
fn run_child(test: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env_remove("CUDA_HOME")
        .env_remove("CUDA_PATH")
        .env_remove("FERRINFER_QUIET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether a library whose path contains `name` is mapped into this process.
fn mapped(name: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|m| m.contains(name))
}

#[test]
fn no_jit_serves_a_warm_cache_with_no_nvrtc_at_all() {
    if let Some(dir) = std::env::var_os(NO_NVRTC_CACHE_VAR) {
        // The child: NVRTC is switched off (FERRINFER_NVRTC=none) and CUDA_HOME unset.
        let err = toolkit::load_nvrtc().unwrap_err();
        assert!(err.message().contains("FERRINFER_NVRTC=none"), "{err}");
        let jit = Jit::new(JitConfig::from_lookup(|k| match k {
            "FERRINFER_NO_JIT" => Some("1".into()),
            "FERRINFER_CACHE_DIR" => Some(dir.to_string_lossy().into_owned()),
            _ => None,
        }));
        assert!(!jit.config().compile);
        for (tu, arch) in deployed_kernels() {
            let k = jit
                .compile(&tu, arch)
                .unwrap_or_else(|e| panic!("{} for {arch} without NVRTC: {e}", tu.name));
            assert_eq!(k.origin, Origin::Disk);
            assert_cubin(&k);
            assert!(
                NVRTC_MAJORS_SEEN.contains(&k.nvrtc.0),
                "the entry records its NVRTC: {:?}",
                k.nvrtc
            );
        }
        // A kernel that is not in the cache is a clear miss, not an NVRTC error.
        match jit.compile(&saxpy_tu("no_nvrtc_absent"), Arch::SM80) {
            Err(Error::CacheMiss(msg)) => assert!(msg.contains("no such file"), "{msg}"),
            other => panic!("expected a cache miss, got {:?}", other.map(|k| k.origin)),
        }
        assert!(!mapped("libnvrtc"), "NVRTC was never loaded");
        return;
    }
    let dir = temp_dir("no_nvrtc");
    let fill = disk_jit(&dir, true);
    for (tu, arch) in deployed_kernels() {
        assert_eq!(fill.compile(&tu, arch).unwrap().origin, Origin::Compiled);
    }
    let (ok, stdout, stderr) = run_child(
        "no_jit_serves_a_warm_cache_with_no_nvrtc_at_all",
        &[
            (NO_NVRTC_CACHE_VAR, dir.to_str().unwrap()),
            ("FERRINFER_NVRTC", "none"),
        ],
    );
    assert!(ok, "child failed:\n{stdout}\n{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The NVRTC major versions a cache entry may record.
const NVRTC_MAJORS_SEEN: [u32; 2] = [12, 13];

/// Set in a child run that compiles one kernel and prints nothing else on stderr.
const ANNOUNCE_VAR: &str = "FERRINFER_TEST_ANNOUNCE";

#[test]
fn each_compile_is_announced_on_stderr_unless_quiet() {
    if let Some(tag) = std::env::var_os(ANNOUNCE_VAR) {
        let tu = saxpy_tu(&tag.to_string_lossy());
        let jit = memory_jit();
        assert_eq!(
            jit.compile(&tu, Arch::SM80).unwrap().origin,
            Origin::Compiled
        );
        assert_eq!(jit.compile(&tu, Arch::SM80).unwrap().origin, Origin::Memory);
        return;
    }
    let test = "each_compile_is_announced_on_stderr_unless_quiet";
    // The child has no CUDA_HOME: it is pointed at the NVRTC this process found.
    let nvrtc = toolkit::nvrtc_library()
        .unwrap()
        .path()
        .to_string_lossy()
        .into_owned();
    let (ok, stdout, stderr) = run_child(
        test,
        &[(ANNOUNCE_VAR, "loud"), ("FERRINFER_NVRTC", nvrtc.as_str())],
    );
    assert!(ok, "{stdout}\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ferrinfer:"))
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "announced once, timed once, a memory hit is silent: {stderr}"
    );
    assert_eq!(lines[0], "ferrinfer: compiling saxpy_loud for sm_80...");
    assert!(
        lines[1].starts_with("ferrinfer: compiled saxpy_loud for sm_80 in ")
            && lines[1].contains(" s (")
            && lines[1].contains("registers"),
        "{}",
        lines[1]
    );
    let (ok, stdout, stderr) = run_child(
        test,
        &[
            (ANNOUNCE_VAR, "quiet"),
            ("FERRINFER_NVRTC", nvrtc.as_str()),
            ("FERRINFER_QUIET", "1"),
        ],
    );
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        !stderr.contains("ferrinfer:"),
        "FERRINFER_QUIET=1: {stderr}"
    );
    assert_eq!(
        memory_jit().announces(),
        std::env::var_os("FERRINFER_QUIET").is_none_or(|v| v == "0")
    );
    assert!(!memory_jit().with_announce(false).announces());
}

#[test]
fn the_driver_check_explains_what_to_do() {
    assert_eq!(toolkit::check_driver((13, 0), (13, 0)), Ok(()));
    assert_eq!(toolkit::check_driver((13, 0), (12, 4)), Ok(()));
    assert_eq!(
        toolkit::check_driver((12, 8), (12, 9)),
        Ok(()),
        "minor versions are compatible"
    );
    let too_new = toolkit::check_driver((12, 8), (13, 0)).unwrap_err();
    for part in [
        "NVRTC 13.0",
        "CUDA 13.x",
        "580.65.06",
        "CUDA 12.8",
        "update the driver",
        "nvidia-cuda-nvrtc-cu12",
    ] {
        assert!(
            too_new.contains(part),
            "{part:?} is missing from: {too_new}"
        );
    }
    let ancient = toolkit::check_driver((12, 2), (12, 2)).unwrap_err();
    assert!(
        ancient.contains("CUDA 12.2") && ancient.contains("CUDA 12.4"),
        "{ancient}"
    );
}

#[test]
fn an_entry_from_another_nvrtc_is_recompiled_when_compiling_is_allowed() {
    let dir = temp_dir("other_nvrtc");
    let tu = saxpy_tu("other_nvrtc");
    let jit = disk_jit(&dir, true);
    let first = jit.compile(&tu, Arch::SM80).unwrap();
    let path = jit.entry_path(&tu, Arch::SM80).unwrap().unwrap();
    // Rewrite the entry as if NVRTC 12.0 had made it (when 12.0 is not the one in use).
    let mut e = cache::decode_any(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(e.nvrtc, first.nvrtc);
    e.nvrtc = if first.nvrtc == (12, 0) {
        (12, 1)
    } else {
        (12, 0)
    };
    std::fs::write(&path, cache::encode(&e)).unwrap();
    // Without JIT it is served as it is (no NVRTC to compare with is needed).
    let served = disk_jit(&dir, false).compile(&tu, Arch::SM80).unwrap();
    assert_eq!((served.origin, served.nvrtc), (Origin::Disk, e.nvrtc));
    // With JIT the NVRTC in use recompiles it, and the cache follows.
    let again = disk_jit(&dir, true).compile(&tu, Arch::SM80).unwrap();
    assert_eq!((again.origin, again.nvrtc), (Origin::Compiled, first.nvrtc));
    let stored = cache::decode_any(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(stored.nvrtc, first.nvrtc);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn listing_a_cache_checks_every_file() {
    let dir = temp_dir("listing");
    let jit = disk_jit(&dir, true);
    for tag in ["list_a", "list_b"] {
        jit.compile(&saxpy_tu(tag), Arch::SM80).unwrap();
    }
    let disk = cache::DiskCache::open(&dir).unwrap();
    let listed = disk.entries().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|l| l.entry.is_ok() && l.bytes > 0));
    // A damaged file and a file under another kernel's name are both reported.
    let a = &listed[0].path;
    let b = &listed[1].path;
    let mut bytes = std::fs::read(a).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(a, &bytes).unwrap();
    std::fs::copy(b, dir.join("0123456789abcdef.cubin")).unwrap();
    let listed = disk.entries().unwrap();
    assert_eq!(listed.len(), 3);
    let bad: Vec<String> = listed
        .iter()
        .filter_map(|l| l.entry.as_ref().err().map(|m| m.to_string()))
        .collect();
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad.iter().any(|m| m.contains("checksum")), "{bad:?}");
    assert!(
        bad.iter().any(|m| m.contains("different key text")),
        "{bad:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
