//! Process hardening for `serve`, applied once at start, before any key is loaded. Each step
//! degrades to a warning in the log when the OS refuses it; none stops the service.
//!
//! 1. **No core dumps.** `RLIMIT_CORE` is set to 0 and the process is marked not dumpable
//!    (`prctl(PR_SET_DUMPABLE, 0)`), so a crash writes no memory image (with keys in it) to
//!    disk, and other processes of the same user cannot `ptrace` it or read its
//!    `/proc/<pid>/mem`.
//! 2. **Memory locking.** `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`, so no page of
//!    the process — key buffers included, wherever the allocator put them — is written to
//!    swap. We lock the whole process rather than individual key buffers because keys are
//!    moved between stack and heap by ordinary Rust code (a per-buffer lock would miss the
//!    copies) and because locking single pages needs `unsafe` pointer calls, which this crate
//!    forbids. `MCL_ONFAULT` locks pages as they are touched instead of pre-faulting every
//!    mapping (thread stacks would otherwise be fully resident). Because `MCL_FUTURE` makes
//!    later allocations fail once the locked total passes `RLIMIT_MEMLOCK`, we lock only when
//!    that limit is unlimited or the process holds `CAP_IPC_LOCK` (which lifts it); otherwise
//!    we warn and run unlocked: swap encryption or no swap is then the operator's remedy.
//!
//! All system calls go through `rustix`'s safe wrappers; the crate keeps
//! `forbid(unsafe_code)`. On systems other than Linux, hardening is a warning only.

/// What [`harden_process`] achieved, for the log and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hardening {
    /// Core dumps are off (limit 0 and not dumpable).
    pub core_dumps_disabled: bool,
    /// All memory is locked against swapping.
    pub memory_locked: bool,
    /// Why a step did not happen, one line each (also logged as warnings).
    pub warnings: Vec<String>,
}

/// Hardens the current process (see the module docs). `lock_memory` false skips step 2.
pub fn harden_process(lock_memory: bool) -> Hardening {
    let mut result = Hardening::default();
    imp::disable_core_dumps(&mut result);
    if lock_memory {
        imp::lock_memory(&mut result);
    } else {
        result
            .warnings
            .push("memory locking disabled by configuration (lock_memory = false)".into());
    }
    for warning in &result.warnings {
        tracing::warn!("hardening: {warning}");
    }
    tracing::info!(
        core_dumps_disabled = result.core_dumps_disabled,
        memory_locked = result.memory_locked,
        "process hardening applied"
    );
    result
}

#[cfg(target_os = "linux")]
mod imp {
    use rustix::mm::{MlockAllFlags, mlockall};
    use rustix::process::{DumpableBehavior, Resource, Rlimit, getrlimit, setrlimit};

    use super::Hardening;

    /// Linux capability number of CAP_IPC_LOCK (linux/capability.h).
    const CAP_IPC_LOCK: u32 = 14;

    pub fn disable_core_dumps(result: &mut Hardening) {
        let limit = setrlimit(
            Resource::Core,
            Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        );
        let dumpable = rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable);
        match (limit, dumpable) {
            (Ok(()), Ok(())) => result.core_dumps_disabled = true,
            (limit, dumpable) => {
                if let Err(e) = limit {
                    result
                        .warnings
                        .push(format!("could not set RLIMIT_CORE to 0: {e}"));
                }
                if let Err(e) = dumpable {
                    result
                        .warnings
                        .push(format!("could not mark the process not dumpable: {e}"));
                }
            }
        }
    }

    /// True if the effective capability set holds CAP_IPC_LOCK (from /proc/self/status).
    fn has_ipc_lock() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status.lines().find_map(|line| {
                    line.strip_prefix("CapEff:")
                        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                })
            })
            .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
    }

    pub fn lock_memory(result: &mut Hardening) {
        let limit = getrlimit(Resource::Memlock).current;
        if limit.is_some() && !has_ipc_lock() {
            result.warnings.push(format!(
                "memory is NOT locked: RLIMIT_MEMLOCK is {} bytes and the process lacks \
                 CAP_IPC_LOCK, and locking all memory under a finite limit would make later \
                 allocations fail; keys may reach swap. Raise the limit (systemd \
                 LimitMEMLOCK=infinity, ulimit -l unlimited) or grant CAP_IPC_LOCK, or run \
                 without swap or with encrypted swap",
                limit.unwrap_or(0)
            ));
            return;
        }
        match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
            Ok(()) => result.memory_locked = true,
            Err(e) => result.warnings.push(format!(
                "memory is NOT locked: mlockall failed ({e}); keys may reach swap"
            )),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::Hardening;

    pub fn disable_core_dumps(result: &mut Hardening) {
        result
            .warnings
            .push("core dumps are not disabled on this OS".into());
    }

    pub fn lock_memory(result: &mut Hardening) {
        result
            .warnings
            .push("memory is NOT locked on this OS; keys may reach swap".into());
    }
}
