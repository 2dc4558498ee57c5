//! Order statistics and the figures the benchmark reports.

use serde::Serialize;

/// The `q`-quantile (0..=1) of `samples` by nearest rank; `None` if empty.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

pub fn median(samples: &[f64]) -> Option<f64> {
    quantile(samples, 0.5)
}

pub fn p99(samples: &[f64]) -> Option<f64> {
    quantile(samples, 0.99)
}

pub fn max(samples: &[f64]) -> Option<f64> {
    samples.iter().copied().max_by(f64::total_cmp)
}

/// `a[i] - b[i]` for runs made in the same round: their median cancels
/// drift that both sides share.
pub fn paired_differences(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// One measured quantity, for tether and for the direct-Docker baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub unit: String,
    pub tether: Option<f64>,
    /// `None` where there is no baseline.
    pub direct: Option<f64>,
    /// tether / direct.
    pub ratio: Option<f64>,
}

impl Figure {
    pub fn new(name: &str, unit: &str, tether: Option<f64>, direct: Option<f64>) -> Figure {
        let ratio = match (tether, direct) {
            (Some(t), Some(d)) if d != 0.0 => Some(round(t / d, 3)),
            _ => None,
        };
        Figure {
            name: name.into(),
            unit: unit.into(),
            tether: tether.map(|t| round(t, 3)),
            direct: direct.map(|d| round(d, 3)),
            ratio,
        }
    }

    /// A figure with no baseline.
    pub fn solo(name: &str, unit: &str, tether: Option<f64>) -> Figure {
        Figure::new(name, unit, tether, None)
    }
}

/// Rounds to `digits` decimals (keeps the JSON readable).
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(median(&v), Some(50.0));
        assert_eq!(p99(&v), Some(99.0));
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
        assert_eq!(median(&[]), None);
        assert_eq!(max(&[1.0, 5.0, 2.0]), Some(5.0));
    }

    #[test]
    fn ratio_is_tether_over_direct() {
        let f = Figure::new("x", "ms", Some(3.0), Some(2.0));
        assert_eq!(f.ratio, Some(1.5));
        assert_eq!(Figure::solo("y", "MiB", Some(1.0)).ratio, None);
    }
}
