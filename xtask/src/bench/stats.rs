//! The arithmetic of the benchmark: a seeded random source, a Zipf sampler
//! over conversations, and percentiles.

/// splitmix64: a small, seeded, reproducible random source (the same seed
/// gives the same conversation sequence in every run).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf over ranks `0..n`: rank `k` is drawn with probability proportional
/// to `1 / (k + 1)^s`. Rank 0 is the busiest conversation.
#[derive(Debug, Clone)]
pub(crate) struct Zipf {
    /// Cumulative probabilities, the last one 1.
    cdf: Vec<f64>,
}

impl Zipf {
    pub(crate) fn new(n: usize, s: f64) -> Self {
        assert!(n > 0, "Zipf needs at least one rank");
        let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        *cdf.last_mut().expect("n > 0") = 1.0;
        Self { cdf }
    }

    /// The probability of rank `k`.
    #[cfg(test)]
    pub(crate) fn p(&self, k: usize) -> f64 {
        self.cdf[k] - if k == 0 { 0.0 } else { self.cdf[k - 1] }
    }

    pub(crate) fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.next_f64();
        // The first rank whose cumulative probability exceeds u.
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// The `q`-quantile (`0.0..=1.0`) of `samples` by nearest rank: the
/// smallest sample with at least `q` of all samples at or below it.
/// `None` when there are none. Infinite samples (a message never answered)
/// sort last, so a p99 over them is infinite when more than 1 % are.
pub(crate) fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(nearest_rank(&sorted, q))
}

/// [`percentile`] over samples already sorted ascending.
pub(crate) fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let rank = (q.clamp(0.0, 1.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        // Unsorted input, one sample.
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn unanswered_messages_make_the_tail_infinite() {
        let mut v: Vec<f64> = vec![1.0; 98];
        v.extend([f64::INFINITY, f64::INFINITY]);
        assert_eq!(percentile(&v, 0.98), Some(1.0));
        assert_eq!(percentile(&v, 0.99), Some(f64::INFINITY));
    }

    #[test]
    fn zipf_frequencies_follow_the_law() {
        let z = Zipf::new(1_000, 1.0);
        let harmonic: f64 = (1..=1_000).map(|k| 1.0 / f64::from(k)).sum();
        assert!((z.p(0) - 1.0 / harmonic).abs() < 1e-12);
        assert!((z.p(9) - 0.1 / harmonic).abs() < 1e-12);
        let mut rng = Rng::new(7);
        let mut counts = vec![0u32; 1_000];
        let draws = 200_000;
        for _ in 0..draws {
            counts[z.sample(&mut rng)] += 1;
        }
        // Rank 1 about twice rank 2 and ten times rank 10, within sampling noise.
        let share = |k: usize| f64::from(counts[k]) / f64::from(draws);
        assert!((share(0) - z.p(0)).abs() < 0.005, "{}", share(0));
        assert!((share(1) - z.p(1)).abs() < 0.004, "{}", share(1));
        assert!((share(9) - z.p(9)).abs() < 0.002, "{}", share(9));
        // The tail is reached: most conversations get some messages.
        assert!(counts.iter().filter(|&&c| c > 0).count() > 900);
    }

    #[test]
    fn a_uniform_zipf_and_a_single_rank_work() {
        let z = Zipf::new(4, 0.0);
        for k in 0..4 {
            assert!((z.p(k) - 0.25).abs() < 1e-12);
        }
        let one = Zipf::new(1, 1.2);
        let mut rng = Rng::new(1);
        assert!((0..100).all(|_| one.sample(&mut rng) == 0));
    }

    #[test]
    fn the_random_source_is_seeded_and_uniform() {
        let a: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..5).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..5).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        let mut r = Rng::new(3);
        let mean = (0..100_000).map(|_| r.next_f64()).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
