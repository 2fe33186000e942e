//! [`ModelShape`]: the sizes of an OPT-style decoder the cost model needs, and the layer list
//! (weights in placement groups, KV cache) the runtime would build for it, so that a policy's
//! weight placement is computed by the runtime's own rule ([`crate::WeightPlan`]).

use flexgen_core::DType;
use flexgen_quant::CompressionConfig;
use serde::{Deserialize, Serialize};

use super::error::{Result, SearchError};
use crate::model::LayerSpec;
use crate::tensor::{CacheSpec, Elem, PlaneSpec, WeightSpec};

/// Sizes of a decoder-only transformer with learned positions and tied input/output
/// embeddings (OPT). `flexgen-opt` builds one from an `OptConfig`; this crate does not depend
/// on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    /// A name for messages (e.g. `facebook/opt-6.7b`).
    pub name: String,
    /// Decoder layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Feed-forward (fc1 output) size.
    pub ffn: usize,
    /// Attention heads.
    pub heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Learned positions.
    pub max_positions: usize,
    /// Size of the token embedding (differs from `hidden` when the model projects in and
    /// out, as opt-350m does).
    pub embed_dim: usize,
}

impl ModelShape {
    /// Checks every size is positive and the heads divide the hidden size.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| SearchError::Shape {
            name: self.name.clone(),
            reason,
        };
        for (what, v) in [
            ("num_layers", self.num_layers),
            ("hidden", self.hidden),
            ("ffn", self.ffn),
            ("heads", self.heads),
            ("vocab", self.vocab),
            ("max_positions", self.max_positions),
            ("embed_dim", self.embed_dim),
        ] {
            if v == 0 {
                return Err(bad(format!("{what} must be positive")));
            }
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(bad(format!(
                "hidden ({}) is not a multiple of heads ({})",
                self.hidden, self.heads
            )));
        }
        Ok(())
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Multiply-adds of the linear layers of one decoder layer per token, times 2 (FLOPs):
    /// q, k, v, out (`4·h²`) and fc1, fc2 (`2·h·ffn`).
    pub fn layer_linear_flops_per_token(&self) -> f64 {
        let (h, f) = (self.hidden as f64, self.ffn as f64);
        2.0 * (4.0 * h * h + 2.0 * h * f)
    }

    /// FLOPs of the output layer (logits against the tied embedding, plus `project_out`) per
    /// token.
    pub fn output_flops_per_token(&self) -> f64 {
        let (v, e, h) = (self.vocab as f64, self.embed_dim as f64, self.hidden as f64);
        let proj = if self.embed_dim != self.hidden {
            2.0 * h * e
        } else {
            0.0
        };
        2.0 * v * e + proj
    }

    /// The KV cache one layer keeps per sequence: K and V as `f32` planes, or, compressed,
    /// each as a plane of packed codes and a plane of `f16` (step, min) pairs per head.
    pub fn cache_spec(&self, compress: Option<&CompressionConfig>) -> CacheSpec {
        let planes = match compress {
            None => vec![
                PlaneSpec {
                    elem: Elem::F32,
                    per_token: self.hidden,
                };
                2
            ],
            Some(c) => {
                let groups = self.head_dim().div_ceil(c.group_size);
                let codes = PlaneSpec {
                    elem: Elem::U8,
                    per_token: self.heads * groups * c.group_bytes(),
                };
                let params = PlaneSpec {
                    elem: Elem::F16,
                    per_token: self.heads * groups * 2,
                };
                vec![codes, params, codes, params]
            }
        };
        CacheSpec { planes }
    }

    /// The schedule's layers in FlexGen's order and with its weight lists: the input
    /// embedding (token and position tables, `project_in`), per decoder layer the attention
    /// (q, k, v, out with biases, layer norm; it keeps the cache) and the MLP (fc1, fc2 with
    /// biases, layer norm) as separate layers when `sep_layer`, else one layer with the two
    /// placement groups, then the output layer (final layer norm, `project_out`, the tied
    /// token table read a second time). 2-D weights are `dtype`.
    pub fn layer_specs(&self, dtype: DType, sep_layer: bool, cache: &CacheSpec) -> Vec<LayerSpec> {
        let (h, f, e) = (self.hidden, self.ffn, self.embed_dim);
        let projected = e != h;
        let m = |name: String, rows, cols| WeightSpec::matrix(name, rows, cols, dtype);
        let v = WeightSpec::vector;
        let mut input = vec![
            m("decoder.embed_tokens.weight".into(), self.vocab, e),
            m(
                "decoder.embed_positions.weight".into(),
                self.max_positions + 2,
                h,
            ),
        ];
        if projected {
            input.push(m("decoder.project_in.weight".into(), h, e));
        }
        let mut layers = vec![LayerSpec {
            name: "input embedding".into(),
            groups: vec![input],
            cache: None,
        }];
        for l in 0..self.num_layers {
            let p = format!("decoder.layers.{l}");
            let mut attn = Vec::new();
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                attn.push(m(format!("{p}.self_attn.{proj}.weight"), h, h));
                attn.push(v(format!("{p}.self_attn.{proj}.bias"), h));
            }
            attn.push(v(format!("{p}.self_attn_layer_norm.weight"), h));
            attn.push(v(format!("{p}.self_attn_layer_norm.bias"), h));
            let mlp = vec![
                m(format!("{p}.fc1.weight"), f, h),
                v(format!("{p}.fc1.bias"), f),
                m(format!("{p}.fc2.weight"), h, f),
                v(format!("{p}.fc2.bias"), h),
                v(format!("{p}.final_layer_norm.weight"), h),
                v(format!("{p}.final_layer_norm.bias"), h),
            ];
            if sep_layer {
                layers.push(LayerSpec {
                    name: format!("attention {l}"),
                    groups: vec![attn],
                    cache: Some(cache.clone()),
                });
                layers.push(LayerSpec {
                    name: format!("mlp {l}"),
                    groups: vec![mlp],
                    cache: None,
                });
            } else {
                layers.push(LayerSpec {
                    name: format!("decoder {l}"),
                    groups: vec![attn, mlp],
                    cache: Some(cache.clone()),
                });
            }
        }
        let mut output = vec![
            v("decoder.final_layer_norm.weight".into(), h),
            v("decoder.final_layer_norm.bias".into(), h),
        ];
        if projected {
            output.push(m("decoder.project_out.weight".into(), e, h));
        }
        output.push(m("decoder.embed_tokens.weight".into(), self.vocab, e));
        layers.push(LayerSpec {
            name: "output embedding".into(),
            groups: vec![output],
            cache: None,
        });
        layers
    }

    /// Whether layer `index` of [`ModelShape::layer_specs`] belongs to a decoder layer (not the
    /// input or output embedding).
    pub fn is_decoder_layer(&self, index: usize, num_schedule_layers: usize) -> bool {
        index > 0 && index + 1 < num_schedule_layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt_1_3b() -> ModelShape {
        ModelShape {
            name: "opt-1.3b".into(),
            num_layers: 24,
            hidden: 2048,
            ffn: 8192,
            heads: 32,
            vocab: 50272,
            max_positions: 2048,
            embed_dim: 2048,
        }
    }

    #[test]
    fn layer_list_matches_the_parameter_count() {
        let s = opt_1_3b();
        s.validate().unwrap();
        let specs = s.layer_specs(DType::F16, true, &s.cache_spec(None));
        assert_eq!(specs.len(), 2 * 24 + 2);
        // Every parameter once, plus the tied token table a second time in the output layer.
        let params: u64 = specs
            .iter()
            .flat_map(|l| l.weights())
            .map(|w| w.numel())
            .sum();
        let tied = 50272 * 2048;
        assert_eq!(params - tied, 1_315_758_080);
        let joined = s.layer_specs(DType::F16, false, &s.cache_spec(None));
        assert_eq!(joined.len(), 24 + 2);
        assert_eq!(joined[1].groups.len(), 2);
        assert_eq!(s.cache_spec(None).token_bytes(), 2 * 2048 * 4);
        // 4-bit groups of 64 along head_dim: 32 bytes of codes and 4 bytes of params per head.
        let packed = s.cache_spec(Some(&CompressionConfig::FLEXGEN_CACHE));
        assert_eq!(packed.token_bytes(), 2 * 32 * (32 + 4));
    }

    #[test]
    fn bad_shapes_are_named() {
        let mut s = opt_1_3b();
        s.heads = 30;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("opt-1.3b") && e.contains("heads (30)"), "{e}");
        s.heads = 32;
        s.vocab = 0;
        assert!(s.validate().unwrap_err().to_string().contains("vocab"));
    }
}
