//! What the simulated stations ask for: which vPSD each request is for (uniform or zipf
//! over a range of ids), from a small deterministic random generator.

use thiserror::Error;

/// xorshift64*: small, fast, deterministic per seed; not for anything secret.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        // 53 random bits, exactly representable.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How requests spread over the vPSDs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distribution {
    Uniform,
    /// Rank k (from 1) is chosen with weight 1 / k^s.
    Zipf(f64),
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("distribution `{0}`: expected `uniform` or `zipf:S` with 0 < S <= 10")]
pub struct BadDistribution(String);

impl std::str::FromStr for Distribution {
    type Err = BadDistribution;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadDistribution(text.to_owned());
        match text.split_once(':') {
            None if text == "uniform" => Ok(Self::Uniform),
            Some(("zipf", exponent)) => {
                let exponent: f64 = exponent.parse().map_err(|_| bad())?;
                if exponent > 0.0 && exponent <= 10.0 {
                    Ok(Self::Zipf(exponent))
                } else {
                    Err(bad())
                }
            }
            _ => Err(bad()),
        }
    }
}

/// Picks the vPSD of each request among `count` ids from `first`.
#[derive(Debug, Clone)]
pub struct VpsdPicker {
    first: u64,
    count: u64,
    /// Cumulative weights for zipf (empty for uniform), ending at 1.0.
    cdf: Vec<f64>,
}

impl VpsdPicker {
    pub fn new(first: u64, count: u64, distribution: Distribution) -> Self {
        let count = count.max(1);
        let cdf = match distribution {
            Distribution::Uniform => Vec::new(),
            Distribution::Zipf(exponent) => {
                let weights: Vec<f64> = (1..=count)
                    .map(|rank| 1.0 / (rank as f64).powf(exponent))
                    .collect();
                let total: f64 = weights.iter().sum();
                let mut sum = 0.0;
                let mut cdf: Vec<f64> = weights
                    .iter()
                    .map(|weight| {
                        sum += weight / total;
                        sum
                    })
                    .collect();
                if let Some(last) = cdf.last_mut() {
                    *last = 1.0;
                }
                cdf
            }
        };
        Self { first, count, cdf }
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.first..self.first + self.count
    }

    pub fn pick(&self, rng: &mut Rng) -> u64 {
        if self.cdf.is_empty() {
            return self.first + rng.next_u64() % self.count;
        }
        let u = rng.unit();
        let rank = self.cdf.partition_point(|cumulative| *cumulative <= u);
        self.first + (rank as u64).min(self.count - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_parse_and_refuse_nonsense() {
        assert_eq!("uniform".parse(), Ok(Distribution::Uniform));
        assert_eq!("zipf:1.2".parse(), Ok(Distribution::Zipf(1.2)));
        for bad in ["zipf", "zipf:0", "zipf:-1", "zipf:x", "normal", ""] {
            assert!(bad.parse::<Distribution>().is_err(), "{bad}");
        }
    }

    #[test]
    fn uniform_covers_every_id_evenly() {
        let picker = VpsdPicker::new(100, 10, Distribution::Uniform);
        let mut rng = Rng::new(1);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            let id = picker.pick(&mut rng);
            assert!((100..110).contains(&id));
            counts[(id - 100) as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| (9_000..11_000).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn zipf_favours_low_ranks_by_the_expected_ratio() {
        let picker = VpsdPicker::new(1, 100, Distribution::Zipf(1.0));
        let mut rng = Rng::new(7);
        let mut counts = vec![0u32; 100];
        for _ in 0..200_000 {
            counts[(picker.pick(&mut rng) - 1) as usize] += 1;
        }
        // Weight 1/k: rank 1 twice rank 2, ten times rank 10.
        let ratio = |a: usize, b: usize| f64::from(counts[a]) / f64::from(counts[b]);
        assert!((1.8..2.2).contains(&ratio(0, 1)), "{}", ratio(0, 1));
        assert!((8.5..11.5).contains(&ratio(0, 9)), "{}", ratio(0, 9));
        assert!(counts[99] > 0, "the tail is reachable");
    }
}
