//! FlexGen's placement rules: weights per layer by the midpoint of each tensor in the layer's
//! cumulative size (slowest tier first), and the KV cache split along the batch in whole
//! sequences.

use crate::policy::Split;
use crate::tier::Tier;

/// The home tier of each tensor of one placement group (FlexGen's `init_weight_list`).
///
/// `sizes[i]` is tensor `i`'s element count and `is_vector[i]` whether it is 1-D. Tensor `i`
/// goes to the tier whose cumulative percentage range, in the order disk, host, compute,
/// contains the midpoint of the tensor in the group, `(C_i - sizes_i / 2) / C_last`, so earlier
/// tensors go to slower tiers. 1-D tensors (biases, norms) stay on the compute tier.
pub fn place_weights(sizes: &[u64], is_vector: &[bool], split: &Split) -> Vec<Tier> {
    let total: u64 = sizes.iter().sum();
    let order = [Tier::Disk, Tier::Host, Tier::Compute];
    let mut cum = [0.0f64; 3];
    let mut acc = 0.0;
    for (c, t) in cum.iter_mut().zip(order) {
        acc += split.percent(t);
        *c = acc;
    }
    let mut prefix = 0u64;
    sizes
        .iter()
        .zip(is_vector)
        .map(|(&size, &vector)| {
            prefix += size;
            if vector {
                return Tier::Compute;
            }
            let mid = if total == 0 {
                0.0
            } else {
                (prefix as f64 - size as f64 / 2.0) / total as f64 * 100.0
            };
            order
                .into_iter()
                .zip(cum)
                .find(|&(_, c)| mid < c)
                .map_or(Tier::Compute, |(t, _)| t)
        })
        .collect()
}

/// How the KV cache of a micro-batch of `seqs` sequences is split over the tiers, in whole
/// sequences and in this order: `[compute, host, disk]` (FlexGen's `TorchMixedDevice` rule:
/// compute gets `floor(seqs · cg / 100)`, host the rest when nothing goes to disk, else
/// `floor(seqs · cc / 100)`, and disk what remains).
pub fn split_cache(seqs: usize, split: &Split) -> [usize; 3] {
    let part = |p: f64| ((seqs as f64 * p / 100.0) + 1e-9).floor() as usize;
    let compute = part(split.compute).min(seqs);
    if split.disk() <= 0.0 {
        return [compute, seqs - compute, 0];
    }
    let host = part(split.host).min(seqs - compute);
    [compute, host, seqs - compute - host]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(c: f64, h: f64) -> Split {
        Split {
            compute: c,
            host: h,
        }
    }

    #[test]
    fn flexgens_attention_example() {
        // q, k, v, out weights with biases in between; wg = 20, wc = 80 puts q, k, v on the host
        // tier and out_proj on compute (midpoints 12.5, 37.5, 62.5, 87.5 percent).
        let h = 64u64;
        let sizes = [h * h, h, h * h, h, h * h, h, h * h, h];
        let vec = [false, true, false, true, false, true, false, true];
        let tiers = place_weights(&sizes, &vec, &split(20.0, 80.0));
        assert_eq!(
            tiers,
            [
                Tier::Host,
                Tier::Compute,
                Tier::Host,
                Tier::Compute,
                Tier::Host,
                Tier::Compute,
                Tier::Compute,
                Tier::Compute
            ]
        );
        // All on disk, all on host, all on compute.
        assert!(place_weights(&sizes, &vec, &split(0.0, 0.0))
            .iter()
            .zip(vec)
            .all(|(t, v)| *t == if v { Tier::Compute } else { Tier::Disk }));
        assert!(place_weights(&sizes, &vec, &split(0.0, 100.0))
            .iter()
            .zip(vec)
            .all(|(t, v)| *t == if v { Tier::Compute } else { Tier::Host }));
        assert!(place_weights(&sizes, &vec, &split(100.0, 0.0))
            .iter()
            .all(|t| *t == Tier::Compute));
        // Half disk, half compute: the first half goes to disk.
        let t = place_weights(&[10, 10, 10, 10], &[false; 4], &split(50.0, 0.0));
        assert_eq!(t, [Tier::Disk, Tier::Disk, Tier::Compute, Tier::Compute]);
        assert!(place_weights(&[], &[], &split(0.0, 0.0)).is_empty());
    }

    #[test]
    fn cache_split_in_whole_sequences() {
        assert_eq!(split_cache(4, &split(100.0, 0.0)), [4, 0, 0]);
        assert_eq!(split_cache(4, &split(0.0, 100.0)), [0, 4, 0]);
        assert_eq!(split_cache(4, &split(0.0, 0.0)), [0, 0, 4]);
        assert_eq!(split_cache(4, &split(50.0, 50.0)), [2, 2, 0]);
        assert_eq!(split_cache(5, &split(50.0, 50.0)), [2, 3, 0]);
        assert_eq!(split_cache(5, &split(30.0, 30.0)), [1, 1, 3]);
        assert_eq!(split_cache(3, &split(33.4, 33.3)), [1, 0, 2]);
        assert_eq!(split_cache(0, &split(30.0, 30.0)), [0, 0, 0]);
        for seqs in 0..20 {
            for (c, h) in [(10.0, 20.0), (99.0, 1.0), (0.0, 55.5), (100.0, 0.0)] {
                let s = split_cache(seqs, &split(c, h));
                assert_eq!(s.iter().sum::<usize>(), seqs);
            }
        }
    }
}
