//! `cmr info`: parameters, size and forward FLOPs of a network.

#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use cmr_models::model_stats;
use cmr_train::{DeviceSpec, TrainConfig, device_name};

use crate::args::InfoArgs;
use crate::commands::open_device;

pub fn run(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let device = open_device(&args.device, DeviceSpec::Cpu)?;
    let cfg = TrainConfig::preset(args.preset, args.arch).model;
    let stats = model_stats(&cfg, args.size, args.size)?;
    if args.json {
        let value = serde_json::json!({
            "arch": args.arch.name(),
            "preset": args.preset.name(),
            "parameters": stats.parameters,
            "size_mb": stats.size_mb,
            "gflops": stats.gflops,
            "input": [stats.height, stats.width],
            "device": device_name(&device),
            "config": cfg,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "network     {} (the {} preset's widths)",
            args.arch.display_name(),
            args.preset
        );
        println!("parameters  {}", stats.parameters);
        println!("size        {:.2} MB (f32)", stats.size_mb);
        println!(
            "forward     {:.2} GFLOPs per {}×{} image",
            stats.gflops, stats.height, stats.width
        );
        println!("device      {}", device_name(&device));
    }
    Ok(ExitCode::SUCCESS)
}
