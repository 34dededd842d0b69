//! The machine an ELF file (executable or shared library) was built for: bundles carry a
//! runtime and engine libraries for one board, and the wrong architecture is refused by name
//! before anything tries to run or load it.

use std::io::Read;
use std::path::Path;

use crate::error::BundleError;

/// The CPU architecture of an ELF file, named as Rust names it (`aarch64`, `x86_64`, ...).
pub fn machine(path: &Path) -> Result<&'static str, BundleError> {
    let bad = |message: &str| BundleError::Elf {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    let mut head = [0u8; 20];
    let mut f = std::fs::File::open(path).map_err(|e| BundleError::io(path, e))?;
    f.read_exact(&mut head)
        .map_err(|_| bad("too short for an ELF file"))?;
    if &head[..4] != b"\x7fELF" {
        return Err(bad("not an ELF file"));
    }
    // e_machine (ELF header offset 18), little-endian on every target we build for.
    Ok(match u16::from_le_bytes([head[18], head[19]]) {
        0xB7 => "aarch64",
        0x3E => "x86_64",
        0x28 => "arm",
        0xF3 => "riscv64",
        other => return Err(bad(&format!("unknown ELF machine {other:#x}"))),
    })
}

/// Checks that `path` is an ELF file for `arch`, naming both machines when it is not.
pub fn expect_machine(path: &Path, arch: &str) -> Result<(), BundleError> {
    let found = machine(path)?;
    if found == arch {
        Ok(())
    } else {
        Err(BundleError::Elf {
            path: path.to_path_buf(),
            message: format!("built for {found}, this needs {arch}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_machine_and_refuses_non_elf_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[18..20].copy_from_slice(&0xB7u16.to_le_bytes());
        let lib = dir.path().join("lib.so");
        std::fs::write(&lib, &head).unwrap();
        assert_eq!(machine(&lib).unwrap(), "aarch64");
        let e = expect_machine(&lib, "x86_64").unwrap_err().to_string();
        assert!(
            e.contains("aarch64") && e.contains("x86_64") && e.contains("lib.so"),
            "{e}"
        );
        let txt = dir.path().join("a.txt");
        std::fs::write(&txt, b"hello, this is text, not ELF").unwrap();
        assert!(machine(&txt)
            .unwrap_err()
            .to_string()
            .contains("not an ELF"));
    }
}
