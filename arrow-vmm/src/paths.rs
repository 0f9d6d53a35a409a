//! Where `arrow-vmm` finds the guest kernel and `arrow-init` by default, and
//! parsing of sizes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The cache the `hack/` scripts fill (guest kernel, templates).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("ARROW_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/arrow"))
}

/// The guest kernel: `--kernel`, else `$ARROW_KERNEL`, else the cached build.
pub fn kernel(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ARROW_KERNEL").map(PathBuf::from))
        .unwrap_or_else(|| cache_dir().join("kernel/vmlinux"));
    if !path.is_file() {
        bail!(
            "guest kernel not found at {}; build it with hack/build-kernel.sh or pass --kernel",
            path.display()
        );
    }
    Ok(path)
}

/// `arrow-init`: `--init`, else `$ARROW_INIT`, else next to this executable.
/// It must be a static binary: the guest has no dynamic loader.
pub fn init(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ARROW_INIT").map(PathBuf::from))
    {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating arrow-vmm")?
            .with_file_name("arrow-init"),
    };
    let data = std::fs::read(&path).with_context(|| {
        format!(
            "reading arrow-init at {}; build it with hack/build.sh or pass --init",
            path.display()
        )
    })?;
    if has_interpreter(&data) {
        bail!(
            "{} is dynamically linked; arrow-init must be static (hack/build.sh builds it so)",
            path.display()
        );
    }
    Ok(path)
}

/// Whether an ELF64 image names a program interpreter (is dynamic).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let read = |off: usize, len: usize| elf.get(off..off + len);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (read(32, 8), read(54, 2), read(56, 2))
    else {
        return false;
    };
    let phoff = u64::from_le_bytes(phoff.try_into().unwrap_or_default()) as usize;
    let phentsize = u16::from_le_bytes(phentsize.try_into().unwrap_or_default()) as usize;
    let phnum = u16::from_le_bytes(phnum.try_into().unwrap_or_default()) as usize;
    (0..phnum).any(|i| {
        read(phoff + i * phentsize, 4)
            .map(|t| u32::from_le_bytes(t.try_into().unwrap_or_default()) == PT_INTERP)
            .unwrap_or(false)
    })
}

/// Parses `256M`, `1G`, `512K` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256M or 1G"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn detects_dynamic_executables() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me), "test binaries are dynamic");
        let guest = vmm_core::test_guest::GuestProgram::new().elf();
        assert!(!has_interpreter(&guest));
        assert!(!has_interpreter(b"short"));
    }
}
