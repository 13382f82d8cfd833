//! Device selection: `auto`, `cpu`, `cuda[:N]`, `metal`.

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Where tensors live. Written `auto`, `cpu`, `cuda`, `cuda:1`, `metal`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// CUDA if this build has it and a GPU answers, then Metal, then the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "metal" | "mps" => Ok(Self::Metal),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device {s:?} (expected auto, cpu, cuda, cuda:N or metal)"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

/// Whether this build was compiled with the `cuda` / `metal` feature.
pub const HAS_CUDA: bool = cfg!(feature = "cuda");
pub const HAS_METAL: bool = cfg!(feature = "metal");

impl DeviceSpec {
    /// Open the device. Asking for a device this build lacks names the cargo
    /// feature to enable; a build that has it but finds no device says so.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !HAS_CUDA {
                    return Err(TrainError::Device(
                        "this build has no CUDA support: rebuild with `--features cuda`".into(),
                    ));
                }
                Device::new_cuda(n)
                    .map_err(|e| TrainError::Device(format!("no CUDA device {n} available: {}", plain(&e))))
            }
            Self::Metal => {
                if !HAS_METAL {
                    return Err(TrainError::Device(
                        "this build has no Metal support: rebuild with `--features metal`".into(),
                    ));
                }
                Device::new_metal(0)
                    .map_err(|e| TrainError::Device(format!("no Metal device available: {}", plain(&e))))
            }
            Self::Auto => {
                if HAS_CUDA {
                    match Device::new_cuda(0) {
                        Ok(d) => {
                            tracing::info!("device: cuda:0");
                            return Ok(d);
                        }
                        Err(e) => tracing::info!("no CUDA device ({}); trying the next", plain(&e)),
                    }
                }
                if HAS_METAL {
                    match Device::new_metal(0) {
                        Ok(d) => {
                            tracing::info!("device: metal");
                            return Ok(d);
                        }
                        Err(e) => tracing::info!("no Metal device ({}); using the CPU", plain(&e)),
                    }
                }
                tracing::info!("device: cpu ({} threads)", candle_core::utils::get_num_threads());
                Ok(Device::Cpu)
            }
        }
    }
}

/// A candle error's message without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set (a user reading "no CUDA device" needs no stack).
fn plain(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => plain(inner),
        other => other.to_string(),
    }
}

/// A short name of an open device for logs and reports.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_errors_drop_the_backtrace() {
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("no device".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert_eq!(plain(&e), "no device");
        assert_eq!(plain(&candle_core::Error::Msg("other".into())), "other");
    }

    #[test]
    fn parse_and_print() {
        for (s, d) in [
            ("auto", DeviceSpec::Auto),
            ("CPU", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("metal", DeviceSpec::Metal),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap(), d);
        }
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        assert_eq!(serde_json::to_string(&DeviceSpec::Cuda(2)).unwrap(), "\"cuda:2\"");
    }

    #[test]
    fn cpu_and_auto_open_here() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        if !HAS_CUDA && !HAS_METAL {
            assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
            let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
            let err = DeviceSpec::Metal.open().unwrap_err().to_string();
            assert!(err.contains("--features metal"), "{err}");
        }
    }
}
