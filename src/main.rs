//! The `lkm-engine` command line.

use clap::{Parser, Subcommand};
use lkm_engine::device::Gpu;

#[derive(Parser)]
#[command(name = "lkm-engine", version, about = "Train and run LKM-UNet segmentation models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show which compute devices this build can use.
    Devices,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices => devices(),
    };
    if let Err(e) = result {
        eprintln!("lkm-engine: {e}");
        std::process::exit(1);
    }
}

fn devices() -> lkm_engine::Result<()> {
    println!("cpu: available");
    match Gpu::new(0) {
        Ok(gpu) => {
            let (free, total) = gpu.memory()?;
            println!(
                "cuda:0: {} ({:.1} of {:.1} GiB free)",
                gpu.name(),
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            );
        }
        Err(e) => println!("cuda: unavailable ({e})"),
    }
    Ok(())
}
