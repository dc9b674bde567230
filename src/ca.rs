//! `weft ca init`: mint a root CA for running ztunnel without a controller (development,
//! VMs, the lab). Refuses to overwrite an existing CA: a CA is never regenerated silently.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{Context, bail};

#[derive(clap::Subcommand)]
pub enum Ca {
    /// Write a new root CA as `<dir>/ca.crt` and `<dir>/ca.key` (mode 0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "weft root CA")]
        name: String,
    },
}

pub fn run(cmd: Ca) -> anyhow::Result<()> {
    match cmd {
        Ca::Init { dir, name } => {
            let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
            for p in [&cert_path, &key_path] {
                if p.exists() {
                    bail!("{} already exists; a CA is never overwritten (move it away first)", p.display());
                }
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let ca = hbone::ca::Ca::new_root(&name)?;
            let (cert, key) = ca.to_pem();
            write(&key_path, &key, 0o600)?;
            write(&cert_path, &cert, 0o644)?;
            println!("wrote {} and {}", cert_path.display(), key_path.display());
            Ok(())
        }
    }
}

fn write(path: &std::path::Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
}
