//! Token sampling: greedy, temperature, top-k and top-p, with a random draw that depends only on
//! `(seed, position)`, so replaying a sequence from any point yields the same tokens.

use serde::{Deserialize, Serialize};

/// Sampling settings of one session.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (None: all).
    pub top_p: Option<f32>,
    /// Seed of the per-position random draw.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// Sampling settings that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Temperature is negative, NaN or infinite.
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    /// top-k of zero keeps nothing.
    #[error("top-k must be at least 1")]
    TopK,
    /// top-p outside (0, 1].
    #[error("top-p must be in (0, 1], got {0}")]
    TopP(f32),
    /// The logits hold no finite value.
    #[error("logits hold no finite value")]
    NoFiniteLogit,
}

impl SamplingParams {
    /// Checks that every setting is usable.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if self.top_k == Some(0) {
            return Err(SamplingError::TopK);
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(SamplingError::TopP(p));
        }
        Ok(())
    }

    /// True when sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// Picks tokens from logits under fixed [`SamplingParams`].
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    /// A sampler for `params`, refused when they are not usable.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Self { params })
    }

    /// The settings in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the token at sequence position `position` (the index the token will occupy).
    pub fn sample(&self, logits: &[f32], position: u64) -> Result<u32, SamplingError> {
        if self.params.is_greedy() {
            // The highest finite logit, the lowest token id among equals; one pass, no copy
            // (this runs on the tail for every token, between its forward and the next hop).
            let mut best: Option<(u32, f32)> = None;
            for (i, &v) in logits.iter().enumerate() {
                if v.is_finite() && best.is_none_or(|(_, b)| v.total_cmp(&b).is_gt()) {
                    best = Some((i as u32, v));
                }
            }
            return best.map(|(i, _)| i).ok_or(SamplingError::NoFiniteLogit);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, v))
            .collect();
        if candidates.is_empty() {
            return Err(SamplingError::NoFiniteLogit);
        }
        // Highest logit first; ties broken by the lower token id, so greedy is argmax.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let keep = self
            .params
            .top_k
            .unwrap_or(candidates.len())
            .min(candidates.len());
        if keep < candidates.len() {
            candidates.select_nth_unstable_by(keep - 1, by_logit);
            candidates.truncate(keep);
        }
        candidates.sort_by(by_logit);
        let max = candidates[0].1;
        let t = self.params.temperature;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|c| (((c.1 - max) / t) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.params.top_p {
            let mut cumulative = 0.0;
            let mut cut = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= f64::from(top_p) {
                    cut = i + 1;
                    break;
                }
            }
            probs.truncate(cut);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let draw = unit_draw(self.params.seed, position);
        let mut cumulative = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if draw < cumulative {
                return Ok(candidates[i].0);
            }
        }
        Ok(candidates[probs.len() - 1].0)
    }
}

/// A uniform draw in [0, 1) that depends only on `(seed, position)`.
pub fn unit_draw(seed: u64, position: u64) -> f64 {
    let mixed = splitmix64(splitmix64(seed) ^ position.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

/// The SplitMix64 finaliser: a cheap, well-mixed 64-bit hash.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        })
        .unwrap()
    }

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 17) as f32 * 0.3).collect()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let s = params(0.0, None, None, 0);
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, -1.0], 0).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN, 0.5, 0.2], 7).unwrap(), 1);
        assert_eq!(s.sample(&[f32::INFINITY, -2.0, -1.0], 0).unwrap(), 2);
        assert_eq!(s.sample(&[0.0, -0.0, 0.0], 0).unwrap(), 0);
        assert_eq!(
            s.sample(&[f32::NAN, f32::NEG_INFINITY], 0),
            Err(SamplingError::NoFiniteLogit)
        );
        let l = logits();
        let max = l.iter().cloned().fold(f32::MIN, f32::max);
        let first = l.iter().position(|&v| v == max).unwrap() as u32;
        assert_eq!(s.sample(&l, 3).unwrap(), first);
    }

    #[test]
    fn draw_depends_only_on_seed_and_position() {
        let s = params(0.8, None, None, 42);
        let l = logits();
        let first: Vec<u32> = (0..50).map(|p| s.sample(&l, p).unwrap()).collect();
        // Replaying from position 20 gives the same tokens as the first run did there.
        let replay: Vec<u32> = (20..50).map(|p| s.sample(&l, p).unwrap()).collect();
        assert_eq!(&first[20..], &replay[..]);
        let other = params(0.8, None, None, 43);
        let different: Vec<u32> = (0..50).map(|p| other.sample(&l, p).unwrap()).collect();
        assert_ne!(first, different, "another seed draws other tokens");
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert!(distinct.len() > 1, "temperature sampling is not greedy");
    }

    #[test]
    fn top_k_and_top_p_restrict_candidates() {
        let l: Vec<f32> = vec![5.0, 4.9, 4.8, -10.0, -10.0];
        let k2 = params(5.0, Some(2), None, 1);
        for p in 0..200 {
            assert!(k2.sample(&l, p).unwrap() < 2);
        }
        let p_small = params(1.0, None, Some(0.3), 1);
        for p in 0..200 {
            assert_eq!(p_small.sample(&l, p).unwrap(), 0);
        }
    }

    #[test]
    fn bad_params_are_refused() {
        let bad = |t, k, p| {
            Sampler::new(SamplingParams {
                temperature: t,
                top_k: k,
                top_p: p,
                seed: 0,
            })
            .is_err()
        };
        assert!(bad(f32::NAN, None, None));
        assert!(bad(-0.1, None, None));
        assert!(bad(f32::INFINITY, None, None));
        assert!(bad(1.0, Some(0), None));
        assert!(bad(1.0, None, Some(0.0)));
        assert!(bad(1.0, None, Some(1.5)));
        assert!(!bad(1.0, Some(5), Some(0.9)));
        let s = params(1.0, None, None, 0);
        assert_eq!(
            s.sample(&[f32::NAN, f32::NAN], 0),
            Err(SamplingError::NoFiniteLogit)
        );
    }

    #[test]
    fn unit_draw_is_in_range() {
        for seed in 0..20 {
            for pos in 0..200 {
                let d = unit_draw(seed, pos);
                assert!((0.0..1.0).contains(&d));
            }
        }
    }
}
