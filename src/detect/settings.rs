//! The detectors' settings read from the configuration file (`anomaly_*` keys; defaults and
//! meanings in docs/OPERATIONS.md, "Anomaly detection").

use super::{Policy, parse_detectors};
use crate::config::{FileConfig, bounded_count, parse_duration_seconds};
use crate::error::{Error, Result};

/// Most keys a detector may be told to track (each costs well under a kilobyte).
pub const MAX_TRACKED: usize = 10_000_000;

fn micros(seconds: u64) -> i64 {
    i64::try_from(seconds.saturating_mul(1_000_000)).unwrap_or(i64::MAX)
}

/// A window setting: a duration of at least one second, in µs.
fn window(name: &str, text: &str) -> Result<i64> {
    match parse_duration_seconds(text)? {
        0 => Err(Error::InvalidArgument(format!(
            "{name} must be at least 1s"
        ))),
        seconds => Ok(micros(seconds)),
    }
}

/// A count that trips a detector: at least 1.
fn threshold(name: &str, value: u32) -> Result<u32> {
    if value == 0 {
        return Err(Error::InvalidArgument(format!("{name} must be at least 1")));
    }
    Ok(value)
}

impl Policy {
    /// The defaults changed by the file's `anomaly_*` keys; INVALID_ARGUMENT naming the
    /// first bad one.
    pub fn from_file(file: &FileConfig) -> Result<Policy> {
        let mut p = Policy::default();
        if let Some(names) = &file.anomaly_detectors_off {
            p.off = parse_detectors("anomaly_detectors_off", names)?;
        }
        if let Some(text) = &file.anomaly_repeat_window {
            p.repeat_window_micros = window("anomaly_repeat_window", text)?;
        }
        if let Some(n) = file.anomaly_max_tracked {
            p.max_tracked = bounded_count("anomaly_max_tracked", n, MAX_TRACKED)?.max(1);
        }
        if let Some(text) = &file.anomaly_spike_interval {
            p.spike.interval_micros = window("anomaly_spike_interval", text)?;
        }
        if let Some(factor) = file.anomaly_spike_factor {
            if !factor.is_finite() || factor < 1.0 {
                return Err(Error::InvalidArgument(
                    "anomaly_spike_factor must be a number of at least 1".into(),
                ));
            }
            p.spike.factor = factor;
        }
        if let Some(n) = file.anomaly_spike_floor {
            p.spike.floor = n;
        }
        if let Some(n) = file.anomaly_spike_warmup {
            p.spike.warmup = n;
        }
        if let Some(text) = &file.anomaly_learning {
            let learning = micros(parse_duration_seconds(text)?);
            p.enumeration.learning_micros = learning;
            p.peer.learning_micros = learning;
        }
        if let Some(text) = &file.anomaly_enumeration_window {
            p.enumeration.window_micros = window("anomaly_enumeration_window", text)?;
        }
        if let Some(n) = file.anomaly_enumeration_tenants {
            p.enumeration.new_tenants = threshold("anomaly_enumeration_tenants", n)?;
        }
        if let Some(text) = &file.anomaly_probe_window {
            p.probing.window_micros = window("anomaly_probe_window", text)?;
        }
        if let Some(n) = file.anomaly_probe_tenants {
            p.probing.tenants = threshold("anomaly_probe_tenants", n)?;
        }
        if let Some(text) = &file.anomaly_tamper_window {
            p.tamper.window_micros = window("anomaly_tamper_window", text)?;
        }
        if let Some(n) = file.anomaly_tamper_failures {
            p.tamper.failures = threshold("anomaly_tamper_failures", n)?;
        }
        if let Some(names) = &file.anomaly_throttle {
            p.throttle = parse_detectors("anomaly_throttle", names)?;
        }
        if let Some(names) = &file.anomaly_quarantine {
            p.quarantine = parse_detectors("anomaly_quarantine", names)?;
        }
        if let Some(rate) = file.anomaly_throttle_rate {
            if !rate.is_finite() || rate <= 0.0 {
                return Err(Error::InvalidArgument(
                    "anomaly_throttle_rate must be more than 0".into(),
                ));
            }
            p.throttle_rate.per_second = rate;
            // Five seconds' worth, at least one call.
            p.throttle_rate.burst = (rate * 5.0).ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
        }
        if let Some(text) = &file.anomaly_throttle_for {
            p.throttle_micros = window("anomaly_throttle_for", text)?;
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_the_defaults_and_bad_values_are_named() {
        let file: FileConfig = toml::from_str(
            "anomaly_detectors_off = [\"new_peer\"]\nanomaly_spike_floor = 7\n\
             anomaly_learning = \"0s\"\nanomaly_throttle = [\"rate_spike\"]\n\
             anomaly_throttle_rate = 2.0\nanomaly_probe_window = \"5m\"\n",
        )
        .unwrap();
        let p = Policy::from_file(&file).unwrap();
        assert_eq!(p.off, vec![super::super::Detector::NewPeer]);
        assert_eq!(p.spike.floor, 7);
        assert_eq!(p.peer.learning_micros, 0);
        assert_eq!(p.enumeration.learning_micros, 0);
        assert_eq!(p.throttle_rate.burst, 10);
        assert_eq!(p.probing.window_micros, 300_000_000);
        for bad in [
            "anomaly_detectors_off = [\"x\"]",
            "anomaly_probe_window = \"0s\"",
            "anomaly_tamper_failures = 0",
            "anomaly_spike_factor = 0.5",
            "anomaly_throttle_rate = 0.0",
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let err = Policy::from_file(&file).unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }
}
