//! Summaries shared by every benchmark: median, p99, min, max over repeated runs.

use serde::Serialize;

/// A summary of repeated measurements, in the unit the caller names.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub unit: &'static str,
    pub n: usize,
    pub median: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(unit: &'static str, samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Self {
            unit,
            n: v.len(),
            median: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:.3} {u}  p99 {:.3} {u}  min {:.3}  max {:.3}  (n={})",
            self.median,
            self.p99,
            self.min,
            self.max,
            self.n,
            u = self.unit
        )
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * sorted.len() as f64).ceil().max(1.0);
    // rank is in 1..=len by construction.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let idx = (rank as usize).min(sorted.len()) - 1;
    sorted[idx]
}

/// Whether `--json` is among the arguments.
pub fn wants_json(args: &[String]) -> bool {
    args.iter().any(|a| a == "--json")
}

/// The value after `--name`, parsed.
pub fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Result<Option<T>, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let v = args.get(i + 1).ok_or_else(|| format!("{name} needs a value"))?;
            v.parse().map(Some).map_err(|_| format!("{name}: cannot parse '{v}'"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p99_of_known_samples() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of("ms", &samples).unwrap();
        assert!((s.median - 50.0).abs() < f64::EPSILON);
        assert!((s.p99 - 99.0).abs() < f64::EPSILON);
        assert!((s.min - 1.0).abs() < f64::EPSILON);
        assert!((s.max - 100.0).abs() < f64::EPSILON);
        assert!(Summary::of("ms", &[]).is_none());
    }

    #[test]
    fn flags_parse_and_report_errors() {
        let args: Vec<String> = ["--runs", "7", "--json", "--bad"].map(String::from).to_vec();
        assert_eq!(flag::<u32>(&args, "--runs").unwrap(), Some(7));
        assert!(wants_json(&args));
        assert!(flag::<u32>(&args, "--bad").is_err());
        assert_eq!(flag::<u32>(&args, "--missing").unwrap(), None);
    }
}
