//! `mender`: a bundle as a Mender artifact, and the update module that installs it. The
//! format is in `edgepack_targets::mender`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use edgepack_targets::{bundle, mender};

pub const AFTER_MENDER: &str = "Examples:
  edgepack mender out/smollm2-imx93.tar.zst --device-type imx93 -o smollm2.mender
  edgepack mender out/smollm2-imx93/ --sign mender-key.pem -o smollm2.mender --json
  edgepack mender --write-module ./modules

The artifact (Mender format 3) carries the bundle as one payload of type `edgepack-bundle`:
artifact name and the provide rootfs-image.edgepack-bundle.version are the release id that
`edgepack deploy` would give it (<bundle folder>-<12 hex of the manifest's sha256>). Device
types default to the bundle's target profile. --sign takes an RSA or ECDSA P-256 private key
(PEM), the kinds `mender-artifact validate -k` and the client's ArtifactVerifyKey check.

On the board, install the update module (--write-module writes it) as
/usr/share/mender/modules/v3/edgepack-bundle. It unpacks the bundle into
<install_dir>/.incoming/<id>, checks every file against manifest.json, then switches
`current` as deploy does; rollback switches back. install_dir (default /opt/edgepack) is set
in /etc/edgepack/mender.conf (`install_dir=/data/edgepack`). See docs/mender.md.";

#[derive(Args, Debug)]
pub struct MenderArgs {
    /// A bundle folder or its .tar.zst.
    #[arg(required_unless_present = "write_module")]
    bundle: Option<PathBuf>,
    /// A device type the artifact installs on (repeat for several; default: the bundle's
    /// target profile).
    #[arg(short = 't', long = "device-type", value_name = "TYPE")]
    device_types: Vec<String>,
    /// Sign the artifact's manifest with this RSA or ECDSA P-256 private key (PEM).
    #[arg(long, value_name = "KEY.pem")]
    sign: Option<PathBuf>,
    /// The bundle signer's public key (PEM): the bundle must be signed with it.
    #[arg(long, value_name = "KEY.pub.pem")]
    key: Option<PathBuf>,
    /// The artifact to write (.mender).
    #[arg(short, long, required_unless_present = "write_module")]
    output: Option<PathBuf>,
    /// Write the update module `edgepack-bundle` into this folder instead.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["bundle", "output", "sign", "device_types", "key"])]
    write_module: Option<PathBuf>,
}

/// The bundle folder behind `path`: the folder itself, or a .tar.zst unpacked into `tmp`.
fn bundle_dir(path: &Path, tmp: &Path) -> Result<PathBuf> {
    if path.is_file() {
        Ok(bundle::unpack(path, tmp)?)
    } else if path.join(bundle::MANIFEST).is_file() {
        Ok(path.to_path_buf())
    } else if path.is_dir() {
        bail!(
            "{}: no manifest.json; not a bundle folder (give a bundle folder or its .tar.zst)",
            path.display()
        )
    } else {
        bail!("{}: no such bundle", path.display())
    }
}

/// Refuses an output that is the bundle archive or lies inside the bundle folder.
fn refuse_writing_over(bundle: &Path, output: &Path) -> Result<()> {
    let Ok(input) = bundle.canonicalize() else {
        return Ok(());
    };
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (Ok(dir), Some(name)) = (parent.canonicalize(), output.file_name()) else {
        return Ok(());
    };
    let out = dir.join(name);
    if out == input || out.starts_with(&input) {
        bail!(
            "{}: the output would overwrite or land inside the bundle {}; write it elsewhere",
            output.display(),
            bundle.display()
        );
    }
    Ok(())
}

pub fn run(a: &MenderArgs, json: bool) -> Result<()> {
    if let Some(dir) = &a.write_module {
        let path = mender::write_module(dir)?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "module": path }))?
            );
        } else {
            println!(
                "wrote {} (install it on the board as /usr/share/mender/modules/v3/{})",
                path.display(),
                mender::PAYLOAD_TYPE
            );
        }
        return Ok(());
    }
    let (Some(bundle), Some(output)) = (&a.bundle, &a.output) else {
        bail!("give a bundle and -o ARTIFACT.mender, or --write-module DIR");
    };
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!(
                "{}: the output's folder {} does not exist",
                output.display(),
                parent.display()
            );
        }
    }
    refuse_writing_over(bundle, output)?;
    let tmp = tempfile::tempdir().context("making a folder to unpack the bundle")?;
    let dir = bundle_dir(bundle, tmp.path())?;
    let opts = mender::Options {
        device_types: a.device_types.clone(),
        signing_key: a.sign.clone(),
        trusted_key: a.key.clone(),
    };
    let art = mender::write_artifact(&dir, &opts, output)
        .with_context(|| format!("writing the Mender artifact {}", output.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&art)?);
    } else {
        println!("{}", art.path.display());
        println!("  artifact name  {}", art.artifact_name);
        println!("  device types   {}", art.device_types.join(", "));
        println!(
            "  payload        {} ({})",
            art.payload_type,
            mender::payload_name(&art.release)
        );
        println!(
            "  signed         {}",
            match art.signed {
                Some(mender::KeyKind::Rsa) => "RSA (PKCS#1 v1.5, SHA-256)",
                Some(mender::KeyKind::EcdsaP256) => "ECDSA P-256 (SHA-256)",
                None => "no",
            }
        );
        println!("  size           {} bytes", art.size);
        println!("  sha256         {}", art.sha256);
    }
    Ok(())
}
