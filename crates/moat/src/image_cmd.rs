//! `moat image ...`: root filesystem images for sandboxes (docs/images.md).
//! Wiring only: importing, sealing, listing and removing live in
//! `moat_sandbox::image`; building runs mmdebstrap and imports its tarball.
//!
//! Must never: run mmdebstrap as anything but its unprivileged mode's
//! caller, or import what it produced without the same sealing as any import.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use moat_sandbox::{image, EngineConfig};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Import a root filesystem (a directory, or a tarball such as `docker
    /// export`'s) as image NAME: copied under the data directory, sealed
    /// read-only (root-owned; no set-id bits, device nodes, FIFOs or sockets;
    /// links kept as links), switched in atomically.
    Import(ImportArgs),
    /// Build image NAME from Debian packages with mmdebstrap.
    Build(BuildArgs),
    /// List the images.
    List,
    /// Remove image NAME and all its versions.
    Rm {
        /// The image's name.
        name: String,
    },
}

#[derive(Args)]
pub struct ImportArgs {
    /// The image's name (a-z, 0-9, '.', '_', '-').
    name: String,
    /// A directory holding a root filesystem, or a tarball of one.
    source: PathBuf,
}

#[derive(Args)]
pub struct BuildArgs {
    /// The image's name.
    name: String,
    /// Debian suite, e.g. bookworm.
    #[arg(long, default_value = "bookworm")]
    suite: String,
    /// Extra package (repeatable).
    #[arg(long = "package", value_name = "P")]
    packages: Vec<String>,
    /// A command run in the new root at the end (mmdebstrap's --customize-hook, chrooted).
    #[arg(long, value_name = "CMD")]
    run: Option<String>,
    /// The Debian mirror (default: mmdebstrap's).
    #[arg(long, value_name = "URL")]
    mirror: Option<String>,
}

pub fn run(cmd: ImageCmd) -> anyhow::Result<()> {
    let config = EngineConfig::from_env();
    let mut out = std::io::stdout().lock();
    match cmd {
        ImageCmd::Import(a) => {
            let got = image::import(&config.data_dir, &config.runtime_dir, &a.name, &a.source)?;
            report(&mut out, &a.name, &got)?;
        }
        ImageCmd::Build(a) => build(&config, a, &mut out)?,
        ImageCmd::List => {
            let all = image::list(&config.data_dir);
            if all.is_empty() {
                writeln!(
                    out,
                    "no images in {} (make one with `moat image import NAME DIR|TARBALL`)",
                    image::images_dir(&config.data_dir).display()
                )?;
            }
            for i in all {
                let mib = i.manifest["bytes"].as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0);
                writeln!(
                    out,
                    "{}\t{}\t{mib:.1} MiB\t{} version(s)\tfrom {}",
                    i.name,
                    i.current.as_deref().unwrap_or("(no current version)"),
                    i.versions,
                    i.manifest["source"].as_str().unwrap_or("?"),
                )?;
            }
        }
        ImageCmd::Rm { name } => {
            image::remove(&config.data_dir, &name)?;
            writeln!(out, "moat: removed the image {name}")?;
        }
    }
    Ok(())
}

fn report(out: &mut impl Write, name: &str, got: &image::Imported) -> anyhow::Result<()> {
    writeln!(
        out,
        "moat: imported {name} as version {} ({:.1} MiB) at {}",
        got.version,
        got.sealed.bytes as f64 / (1024.0 * 1024.0),
        got.root.display()
    )?;
    let dropped = got.sealed.specials_dropped.len() + got.skipped.len();
    if dropped > 0 {
        writeln!(
            out,
            "moat: left out {dropped} device node(s), FIFO(s) or socket(s)"
        )?;
    }
    for p in &got.sealed.setid_stripped {
        writeln!(out, "moat: removed the set-id bit of /{}", p.display())?;
    }
    Ok(())
}

fn build(config: &EngineConfig, a: BuildArgs, out: &mut impl Write) -> anyhow::Result<()> {
    moat_policy::images::check_name(&a.name).map_err(anyhow::Error::msg)?;
    let found = Command::new("mmdebstrap").arg("--version").output();
    if !found.is_ok_and(|o| o.status.success()) {
        bail!(
            "moat image build needs mmdebstrap, which is not installed: apt-get install mmdebstrap \
             (or build the root filesystem elsewhere and `moat image import {} DIR|TARBALL`)",
            a.name
        );
    }
    let scratch = tempfile_dir(&config.data_dir)?;
    let tarball = scratch.join("root.tar");
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=apt").arg("--format=tar");
    if !a.packages.is_empty() {
        cmd.arg(format!("--include={}", a.packages.join(",")));
    }
    if let Some(r) = &a.run {
        cmd.arg(format!(
            "--customize-hook=chroot \"$1\" sh -c {}",
            shell_quote(r)
        ));
    }
    cmd.arg(&a.suite).arg(&tarball);
    if let Some(m) = &a.mirror {
        cmd.arg(m);
    }
    let status = cmd.status().context("running mmdebstrap")?;
    let result = if status.success() {
        let mut label = format!("mmdebstrap {}", a.suite);
        if !a.packages.is_empty() {
            label.push_str(&format!(" --package {}", a.packages.join(",")));
        }
        image::import_as(
            &config.data_dir,
            &config.runtime_dir,
            &a.name,
            &tarball,
            &label,
        )
        .map_err(anyhow::Error::from)
    } else {
        Err(anyhow::anyhow!("mmdebstrap failed ({status})"))
    };
    let _ = std::fs::remove_dir_all(&scratch);
    report(out, &a.name, &result?)
}

fn tempfile_dir(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let d = data_dir.join(format!(
        ".image-build-{}",
        moat_sandbox::versions::random_hex()
    ));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
