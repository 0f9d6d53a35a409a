//! Clone or boot: how a guest VM is started from a [`VmConfig`], the
//! project's central idea. A VM is a clone of the template made from the
//! same inputs if there is one; otherwise it boots, and once its guest is
//! ready (the caller says what ready means: for Arrow, arrow-init answers
//! on vsock) it is snapshotted as the template for the next ones.
//!
//! Creating a template holds its lock in the cache, so concurrent launches
//! of one guest boot once: the others wait for the template and clone it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::cancel::{Cancel, Interrupted};
use crate::cmdline::KernelCmdline;
use crate::exit::VmExit;
use crate::hypervisor::KvmFlavour;
use crate::template::{CloneOutcome, TemplateCache, TemplateError, TemplateInputs};
use crate::vm::{ConsoleOutput, Vm, VmConfig, VmError};

/// How to get a guest VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Clone the matching template; boot (and save a template) if none.
    CloneOrBoot,
    /// Boot afresh and save no template.
    Boot,
    /// Boot afresh and save the template, replacing any.
    BootAndSaveTemplate,
}

/// Why a guest could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
    #[error(transparent)]
    Template(TemplateError),
    #[error("reading the kernel {}: {source}", path.display())]
    Kernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest console: {0}")]
    Console(#[source] std::io::Error),
    #[error("building the VM: {0}")]
    Build(#[source] VmError),
    #[error("starting the VM: {0}")]
    Start(#[source] VmError),
    /// The VM ended before its guest was ready.
    #[error("the {what} stopped before it was ready: {why}")]
    Stopped { what: &'static str, why: String },
    /// The guest was not ready in time, or the caller's readiness check
    /// failed.
    #[error("{0}")]
    NotReady(String),
}

impl From<TemplateError> for LaunchError {
    fn from(e: TemplateError) -> Self {
        match e {
            TemplateError::Interrupted(i) => LaunchError::Interrupted(i),
            other => LaunchError::Template(other),
        }
    }
}

/// What a launch reports on its way, for the caller to time or print.
#[derive(Debug)]
pub enum LaunchEvent<'a> {
    /// A fresh VM was built (before it runs).
    Built {
        flavour: KvmFlavour,
        cmdline: &'a str,
    },
    /// The booted guest is ready.
    Booted,
    /// Its template was saved.
    TemplateSaved,
    /// A template could not be saved; the VM runs on without one.
    TemplateNotSaved(&'a TemplateError),
    /// A template was unusable and removed (to be rebuilt), and why.
    TemplateRemoved(&'a str),
    /// A clone was restored (before it runs).
    CloneRestored,
    /// The clone's guest took its vsock transport reset: it is ready.
    CloneReady,
}

/// What a launch needs from its caller.
pub trait LaunchHooks {
    /// What the caller's readiness check yields (a client of the guest).
    type Ready;

    /// A console for the next VM built or restored (one per attempt).
    fn console(&mut self) -> std::io::Result<ConsoleOutput>;

    /// Waits at most `timeout` until a freshly booted guest is ready. It
    /// must give up when `vm` ends or `cancel` is requested.
    fn wait_ready(
        &mut self,
        vm: &Vm,
        timeout: Duration,
        cancel: &Cancel,
    ) -> Result<Self::Ready, LaunchError>;

    /// Told what happens; nothing by default.
    fn event(&mut self, _event: LaunchEvent<'_>) {}
}

/// A started guest.
pub struct Launched<R> {
    pub vm: Vm,
    /// What the readiness check of a boot returned; `None` for a clone,
    /// whose guest was ready when its template was saved.
    pub ready: Option<R>,
    /// Whether the VM is a clone of a template.
    pub cloned: bool,
    /// The template it was cloned from or saved as, if any.
    pub template: Option<PathBuf>,
}

/// The template key of a guest built from `config`: its kernel (read
/// here), initramfs, shape, command line (the VMM's own arguments too, so
/// a VMM that boots guests differently makes new templates), KVM flavour
/// and devices.
pub fn template_key(config: &VmConfig) -> Result<String, LaunchError> {
    let kernel = std::fs::read(&config.kernel).map_err(|source| LaunchError::Kernel {
        path: config.kernel.clone(),
        source,
    })?;
    let flavour = config.flavour.unwrap_or_else(KvmFlavour::detect);
    let mut kernel_args = KernelCmdline::for_flavour(flavour, config.vcpus)
        .args()
        .to_vec();
    kernel_args.extend(config.kernel_args.iter().cloned());
    Ok(TemplateInputs {
        kernel: &kernel,
        initramfs: config.initramfs.as_deref().unwrap_or_default(),
        vcpus: config.vcpus,
        memory_bytes: config.memory_bytes,
        kernel_args: &kernel_args,
        flavour: &flavour.to_string(),
        devices: &config.device_set(),
    }
    .key())
}

/// Says why a VM ended: the guest kernel's panic, else the last lines of
/// its console.
pub fn explain_exit(vm: &Vm, exit: &VmExit) -> String {
    if let Some(panic) = vm.console().kernel_panic() {
        return format!("the guest kernel panicked: {panic}");
    }
    let tail = vm.console().text();
    let last: Vec<&str> = tail.lines().rev().take(15).collect();
    let last: Vec<&str> = last.into_iter().rev().collect();
    if last.is_empty() {
        format!("the VM ended ({exit}) with no console output")
    } else {
        format!(
            "the VM ended ({exit}); last console lines:\n  {}",
            last.join("\n  ")
        )
    }
}

/// How to start a guest.
pub struct Launch<'a> {
    pub origin: Origin,
    pub cache: &'a TemplateCache,
    /// The config's [`template_key`].
    pub key: &'a str,
    /// How long a boot may take to be ready, and a clone to take its vsock
    /// reset.
    pub ready_timeout: Duration,
    pub cancel: &'a Cancel,
}

impl Launch<'_> {
    /// Starts a guest from `config` (its console is ignored: `hooks` makes
    /// one for each attempt): a clone of the matching template, or a boot
    /// that waits for the guest and, unless the origin is
    /// [`Origin::Boot`], saves the template for the next ones.
    pub fn start<H: LaunchHooks>(
        &self,
        mut config: VmConfig,
        hooks: &mut H,
    ) -> Result<Launched<H::Ready>, LaunchError> {
        let mut lock = None;
        if self.origin != Origin::Boot {
            if self.origin == Origin::CloneOrBoot {
                if let Some(vm) = self.clone(&config, hooks)? {
                    return self.started_clone(vm, hooks);
                }
            }
            lock = Some(self.cache.lock(self.key, self.cancel)?);
            if self.origin == Origin::CloneOrBoot {
                // Another launch may have made it while this one waited.
                if let Some(vm) = self.clone(&config, hooks)? {
                    return self.started_clone(vm, hooks);
                }
            } else {
                let _ = std::fs::remove_dir_all(self.cache.dir(self.key));
            }
        }

        config.console = hooks.console().map_err(LaunchError::Console)?;
        let mut vm = Vm::build(config).map_err(LaunchError::Build)?;
        hooks.event(LaunchEvent::Built {
            flavour: vm.flavour(),
            cmdline: vm.cmdline(),
        });
        self.cancel.watch(&vm);
        vm.start().map_err(LaunchError::Start)?;
        let ready = hooks.wait_ready(&vm, self.ready_timeout, self.cancel)?;
        hooks.event(LaunchEvent::Booted);
        let mut template = None;
        if self.origin != Origin::Boot {
            match self.cache.publish(self.key, &mut vm) {
                Ok(dir) => {
                    hooks.event(LaunchEvent::TemplateSaved);
                    template = Some(dir);
                }
                Err(e) if self.origin == Origin::BootAndSaveTemplate => return Err(e.into()),
                Err(e) => hooks.event(LaunchEvent::TemplateNotSaved(&e)),
            }
        }
        drop(lock);
        self.cancel.check()?;
        Ok(Launched {
            vm,
            ready: Some(ready),
            cloned: false,
            template,
        })
    }

    /// A clone of the template, if there is a usable one.
    fn clone<H: LaunchHooks>(
        &self,
        config: &VmConfig,
        hooks: &mut H,
    ) -> Result<Option<Vm>, LaunchError> {
        let console = hooks.console().map_err(LaunchError::Console)?;
        match self
            .cache
            .clone_vm(self.key, config.restore_config(console))?
        {
            CloneOutcome::Cloned(vm) => Ok(Some(*vm)),
            CloneOutcome::Absent => Ok(None),
            CloneOutcome::Removed(why) => {
                hooks.event(LaunchEvent::TemplateRemoved(&why));
                Ok(None)
            }
        }
    }

    /// Starts a restored clone and waits until its guest has dropped the
    /// template's vsock connections: a connection made before that would be
    /// reset with them, so only then is the guest reachable.
    fn started_clone<H: LaunchHooks>(
        &self,
        mut vm: Vm,
        hooks: &mut H,
    ) -> Result<Launched<H::Ready>, LaunchError> {
        hooks.event(LaunchEvent::CloneRestored);
        self.cancel.watch(&vm);
        vm.start().map_err(LaunchError::Start)?;
        let deadline = Instant::now() + self.ready_timeout;
        while !vm.vsock_reset_taken() {
            self.cancel.check()?;
            if let Some(exit) = vm.wait(Some(Duration::from_millis(1))) {
                return Err(LaunchError::Stopped {
                    what: "clone",
                    why: explain_exit(&vm, &exit),
                });
            }
            if Instant::now() > deadline {
                return Err(LaunchError::NotReady(format!(
                    "the clone's guest did not take its vsock reset within {} s; {}",
                    self.ready_timeout.as_secs(),
                    explain_exit(&vm, &VmExit::Stopped)
                )));
            }
        }
        hooks.event(LaunchEvent::CloneReady);
        self.cancel.check()?;
        Ok(Launched {
            vm,
            ready: None,
            cloned: true,
            template: Some(self.cache.dir(self.key)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_covers_the_arguments_the_vmm_adds() {
        let dir = std::env::temp_dir().join(format!("arrow-launch-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        let mut config = VmConfig::new(&kernel);
        config.flavour = Some(KvmFlavour::Pvm);
        let key = template_key(&config).unwrap();
        let callers_only = TemplateInputs {
            kernel: b"kernel",
            initramfs: &[],
            vcpus: config.vcpus,
            memory_bytes: config.memory_bytes,
            kernel_args: &[],
            flavour: &KvmFlavour::Pvm.to_string(),
            devices: &config.device_set(),
        }
        .key();
        assert_ne!(
            key, callers_only,
            "a VMM booting guests differently reuses templates"
        );
        config.kernel_args.push("quiet".into());
        assert_ne!(template_key(&config).unwrap(), key);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
