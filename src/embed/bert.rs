//! Our own BERT forward pass on candle. Written here rather than taken from
//! candle-transformers so that the attention mask uses a value that stays finite in
//! f16/bf16 (candle's uses `f32::MIN`, which becomes -inf and then NaN), Q, K and V run as
//! one fused matmul, and pooling happens on the same device before anything is copied back.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use super::config::{BertConfig, Pooling};

/// Added to attention scores of padding positions. exp(-10000) is 0 in every float type,
/// and -10000 is representable in f16 and bf16.
const MASKED_SCORE: f64 = -10_000.0;

#[derive(Clone, Copy)]
enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::GeluErf if x.dtype() == DType::F32 && x.device().is_cpu() => {
                x.apply_op1_no_bwd(&super::ops::FastGelu)
            }
            Activation::GeluErf => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
        }
    }
}

/// A linear layer: candle's, in the model's float type (GPU, bf16), or one of our CPU
/// kernels with prepacked weights: f32 (`gemm`) or int8 (`qlinear`).
enum Dense {
    Float(Linear),
    F32(super::gemm::PackedLinear),
    Split(super::split::SplitLinear),
    Int8(super::qlinear::QLinear),
}

impl Dense {
    fn new(lin: Linear, kind: DenseKind) -> candle_core::Result<Self> {
        if kind == DenseKind::Candle {
            return Ok(Dense::Float(lin));
        }
        let (n, k) = lin.weight().dims2()?;
        let w = lin.weight().flatten_all()?.to_vec1::<f32>()?;
        let b = lin.bias().expect("bias loaded").to_vec1::<f32>()?;
        Ok(match kind {
            DenseKind::Int8 => Dense::Int8(super::qlinear::QLinear::new(&w, &b, n, k)),
            DenseKind::Split(p) => Dense::Split(super::split::SplitLinear::new(&w, &b, n, k, p)),
            _ => Dense::F32(super::gemm::PackedLinear::new(&w, &b, n, k)),
        })
    }

    /// Our CPU kernel, if this layer runs on one.
    fn row(&self) -> Option<&dyn super::gemm::RowLinear> {
        match self {
            Dense::Float(_) => None,
            Dense::F32(p) => Some(p),
            Dense::Split(p) => Some(p),
            Dense::Int8(q) => Some(q),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DenseKind {
    Candle,
    F32,
    /// f32 products as bf16 tile products (`split`).
    Split(super::split::Products),
    Int8,
}

struct Layer {
    qkv: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    out_norm: LayerNorm,
    /// The two LayerNorms as plain vectors, for the CPU pass (`cpu`).
    norms: Option<(super::cpu::Norm, super::cpu::Norm)>,
}

pub struct Bert {
    word: Embedding,
    position: Tensor,
    token_type0: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    act: Activation,
    dtype: DType,
    device: Device,
}

fn linear(vb: VarBuilder, n_in: usize, n_out: usize) -> candle_core::Result<Linear> {
    let w = vb.get((n_out, n_in), "weight")?;
    let b = vb.get(n_out, "bias")?;
    Ok(Linear::new(w, Some(b)))
}

/// `lin(x)`. With `fused` (f16 on CUDA) the bias is added by our kernel instead of
/// candle's broadcast add, which was over half of the GPU time.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn linear_bias(lin: &Dense, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
    let lin = match lin {
        Dense::Int8(q) => return x.apply_op1_no_bwd(q),
        Dense::F32(p) => return x.apply_op1_no_bwd(p),
        Dense::Split(p) => return x.apply_op1_no_bwd(p),
        Dense::Float(lin) => lin,
    };
    #[cfg(feature = "cuda")]
    if fused {
        let xw = x.matmul(&lin.weight().t()?)?;
        return super::fused::bias_add(&xw, lin.bias().expect("bias loaded"));
    }
    lin.forward(x)
}

/// `lin(x) + residual`, in one kernel after the matmul when `fused`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn linear_residual(
    lin: &Dense,
    x: &Tensor,
    residual: &Tensor,
    fused: bool,
) -> candle_core::Result<Tensor> {
    let lin = match lin {
        Dense::Int8(q) => return x.apply_op1_no_bwd(q)? + residual,
        Dense::F32(p) => return x.apply_op1_no_bwd(p)? + residual,
        Dense::Split(p) => return x.apply_op1_no_bwd(p)? + residual,
        Dense::Float(lin) => lin,
    };
    #[cfg(feature = "cuda")]
    if fused {
        let xw = x.matmul(&lin.weight().t()?)?;
        return super::fused::bias_residual(&xw, lin.bias().expect("bias loaded"), residual);
    }
    lin.forward(x)? + residual
}

/// `act(lin(x))`, with bias and GELU in one kernel after the matmul when `fused`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn linear_act(
    lin: &Dense,
    x: &Tensor,
    act: Activation,
    fused: bool,
) -> candle_core::Result<Tensor> {
    let lin = match lin {
        Dense::Int8(q) => return act.apply(&x.apply_op1_no_bwd(q)?),
        Dense::F32(p) => return act.apply(&x.apply_op1_no_bwd(p)?),
        Dense::Split(p) => return act.apply(&x.apply_op1_no_bwd(p)?),
        Dense::Float(lin) => lin,
    };
    #[cfg(feature = "cuda")]
    if fused && matches!(act, Activation::GeluErf) {
        let xw = x.matmul(&lin.weight().t()?)?;
        return super::fused::bias_gelu(&xw, lin.bias().expect("bias loaded"));
    }
    act.apply(&lin.forward(x)?)
}

fn plain_norm(ln: &LayerNorm) -> candle_core::Result<super::cpu::Norm> {
    let beta = match ln.bias() {
        Some(b) => b.to_dtype(DType::F32)?.to_vec1()?,
        None => vec![0.0; ln.weight().dim(0)?],
    };
    Ok(super::cpu::Norm {
        gamma: ln.weight().to_dtype(DType::F32)?.to_vec1()?,
        beta,
        eps: ln.eps() as f32,
    })
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    let (w, b) = if vb.contains_tensor("weight") {
        (vb.get(size, "weight")?, vb.get(size, "bias")?)
    } else {
        (vb.get(size, "gamma")?, vb.get(size, "beta")?)
    };
    Ok(LayerNorm::new(w, b, eps))
}

impl Bert {
    /// With `Int8`, the linear layers are quantized (CPU only; see `qlinear`). f32 on the
    /// CPU runs our own kernels (`gemm`, or `split` with `F32Matmul::High` or `Medium`
    /// where the processor has AMX-BF16, and `cpu`); every other case candle's.
    pub fn load(
        vb: VarBuilder,
        cfg: &BertConfig,
        precision: super::Precision,
        f32_matmul: super::F32Matmul,
    ) -> candle_core::Result<Self> {
        let cpu = vb.device().is_cpu() && vb.dtype() == DType::F32;
        let kind = match (
            precision == super::Precision::Int8,
            cpu,
            f32_matmul.split_products(),
        ) {
            (true, _, _) => DenseKind::Int8,
            (false, true, Some(products)) => DenseKind::Split(products),
            (false, true, None) => DenseKind::F32,
            (false, false, _) => DenseKind::Candle,
        };
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let word = Embedding::new(emb.get((cfg.vocab_size, h), "word_embeddings.weight")?, h);
        let position = emb.get(
            (cfg.max_position_embeddings, h),
            "position_embeddings.weight",
        )?;
        let token_type0 = emb
            .get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?
            .get(0)?;
        let emb_norm = layer_norm(emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let att = l.pp("attention");
            let q = linear(att.pp("self.query"), h, h)?;
            let k = linear(att.pp("self.key"), h, h)?;
            let v = linear(att.pp("self.value"), h, h)?;
            let w = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
            let b = Tensor::cat(
                &[
                    q.bias().expect("bias loaded"),
                    k.bias().expect("bias loaded"),
                    v.bias().expect("bias loaded"),
                ],
                0,
            )?;
            let attn_norm = layer_norm(att.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?;
            let out_norm = layer_norm(l.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?;
            let norms = if cpu {
                Some((plain_norm(&attn_norm)?, plain_norm(&out_norm)?))
            } else {
                None
            };
            layers.push(Layer {
                qkv: Dense::new(Linear::new(w, Some(b)), kind)?,
                attn_out: Dense::new(linear(att.pp("output.dense"), h, h)?, kind)?,
                attn_norm,
                intermediate: Dense::new(
                    linear(l.pp("intermediate.dense"), h, cfg.intermediate_size)?,
                    kind,
                )?,
                output: Dense::new(
                    linear(l.pp("output.dense"), cfg.intermediate_size, h)?,
                    kind,
                )?,
                out_norm,
                norms,
            });
        }
        let act = match cfg.hidden_act.as_str() {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "hidden_act {other:?} is not supported (gelu, gelu_new, relu are)"
                )))
            }
        };
        Ok(Self {
            word,
            position,
            token_type0,
            emb_norm,
            layers,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            act,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether [`Bert::forward_packed`] applies: f32 on the CPU (its attention op is ours,
    /// f32 only).
    pub fn packs(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32
    }

    /// The part of a layer after attention, shared by the padded and the packed pass:
    /// output projection + residual, norm, feed-forward + residual, norm.
    fn finish_layer(
        &self,
        layer: &Layer,
        ctx: &Tensor,
        x: &Tensor,
        fused: bool,
    ) -> candle_core::Result<Tensor> {
        let a = linear_residual(&layer.attn_out, ctx, x, fused)?;
        let x = layer.attn_norm.forward(&a)?;
        let i = linear_act(&layer.intermediate, &x, self.act, fused)?;
        let o = linear_residual(&layer.output, &i, &x, fused)?;
        layer.out_norm.forward(&o)
    }

    /// Runs a padded batch and pools it. `ids` and `mask` are `(batch, len)`; `mask` is 1
    /// for real tokens and 0 for padding. Returns `(batch, hidden)` in f32.
    pub fn forward_pooled(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        pooling: Pooling,
    ) -> candle_core::Result<Tensor> {
        self.forward_pooled_with(ids, mask, pooling, &mut || {})
    }

    /// As [`Bert::forward_pooled`], calling `between` after each layer (the encoder thread
    /// answers waiting queries there, see `worker`).
    pub fn forward_pooled_with(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        pooling: Pooling,
        between: &mut dyn FnMut(),
    ) -> candle_core::Result<Tensor> {
        let (b, len) = ids.dims2()?;
        let hidden = self.heads * self.head_dim;
        let pos = self.position.narrow(0, 0, len)?;
        let mut x = self
            .word
            .forward(ids)?
            .broadcast_add(&pos)?
            .broadcast_add(&self.token_type0)?;
        x = self.emb_norm.forward(&x)?.reshape((b * len, hidden))?;

        // (b, 1, 1, len): 0 where attended, MASKED_SCORE at padding.
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * (-MASKED_SCORE))?
            .to_dtype(self.dtype)?
            .reshape((b, 1, 1, len))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        #[cfg(feature = "cuda")]
        let fused = super::fused::applies(&x);
        #[cfg(not(feature = "cuda"))]
        let fused = false;
        for layer in &self.layers {
            let qkv = linear_bias(&layer.qkv, &x, fused)?
                .reshape((b, len, 3, self.heads, self.head_dim))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?;
            let q = (qkv.get(0)? * scale)?;
            let k = qkv.get(1)?;
            let v = qkv.get(2)?;
            let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b * len, hidden))?;
            x = self.finish_layer(layer, &ctx, &x, fused)?;
            between();
        }
        let x = x.reshape((b, len, hidden))?.to_dtype(DType::F32)?;
        let mask = mask.to_dtype(DType::F32)?;
        match pooling {
            Pooling::Cls => x.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                let sum = x.broadcast_mul(&m)?.sum(1)?;
                let count = mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)
            }
            Pooling::Max => {
                let pad = ((mask.unsqueeze(2)? - 1.0)? * 1e9)?;
                x.broadcast_add(&pad)?.max(1)
            }
        }
    }

    /// The CPU forward pass without padding (f32 only, see [`Bert::packs`]): the batch's
    /// tokens back to back, attention per sentence (`packed`). Returns
    /// `(sequences, hidden)` in f32, like
    /// [`Bert::forward_pooled`] on the same sequences.
    pub fn forward_packed(&self, seqs: &[&[u32]], pooling: Pooling) -> candle_core::Result<Tensor> {
        self.forward_packed_with(seqs, pooling, &mut || {})
    }

    /// As [`Bert::forward_packed`], calling `between` after each layer.
    pub fn forward_packed_with(
        &self,
        seqs: &[&[u32]],
        pooling: Pooling,
        between: &mut dyn FnMut(),
    ) -> candle_core::Result<Tensor> {
        let hidden = self.heads * self.head_dim;
        let mut spans = Vec::with_capacity(seqs.len());
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        for s in seqs {
            spans.push((ids.len(), s.len()));
            ids.extend_from_slice(s);
            pos.extend(0..s.len() as u32);
        }
        let tokens = ids.len();
        let ids = Tensor::from_vec(ids, tokens, &self.device)?;
        let pos = Tensor::from_vec(pos, tokens, &self.device)?;
        let x = (self.word.forward(&ids)? + self.position.index_select(&pos, 0)?)?
            .broadcast_add(&self.token_type0)?;
        let x = self.emb_norm.forward(&x)?;
        let attention = super::packed::PackedAttention {
            spans: &spans,
            heads: self.heads,
            head_dim: self.head_dim,
        };
        let x = match self.cpu_layers() {
            Some(layers) => {
                let mut rows = x.flatten_all()?.to_vec1::<f32>()?;
                let attend = |qkv: &[f32], ctx: &mut [f32]| attention.run_into(qkv, ctx);
                super::cpu::encode(&layers, &mut rows, hidden, &attend, between);
                Tensor::from_vec(rows, (tokens, hidden), &self.device)?
            }
            None => {
                let mut x = x;
                for layer in &self.layers {
                    let qkv = linear_bias(&layer.qkv, &x, false)?;
                    let ctx = qkv.apply_op1_no_bwd(&attention)?;
                    x = self.finish_layer(layer, &ctx, &x, false)?;
                    between();
                }
                x
            }
        };
        match pooling {
            Pooling::Cls => {
                let first: Vec<u32> = spans.iter().map(|&(off, _)| off as u32).collect();
                x.index_select(&Tensor::new(first, &self.device)?, 0)
            }
            Pooling::Mean => {
                // (sequences, tokens) with 1/len over each sentence's rows: one matmul.
                let mut weights = vec![0f32; seqs.len() * tokens];
                for (i, &(off, len)) in spans.iter().enumerate() {
                    let w = 1.0 / len.max(1) as f32;
                    weights[i * tokens + off..i * tokens + off + len].fill(w);
                }
                Tensor::from_vec(weights, (seqs.len(), tokens), &self.device)?.matmul(&x)
            }
            Pooling::Max => {
                let rows = spans
                    .iter()
                    .map(|&(off, len)| x.narrow(0, off, len)?.max_keepdim(0))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?.reshape((seqs.len(), hidden))
            }
        }
    }

    /// The layers as our CPU kernels see them, when every one runs on them.
    fn cpu_layers(&self) -> Option<Vec<super::cpu::CpuLayer<'_>>> {
        self.layers
            .iter()
            .map(|l| {
                let (attn_norm, out_norm) = l.norms.as_ref()?;
                Some(super::cpu::CpuLayer {
                    qkv: l.qkv.row()?,
                    attn_out: l.attn_out.row()?,
                    attn_norm,
                    intermediate: l.intermediate.row()?,
                    output: l.output.row()?,
                    out_norm,
                })
            })
            .collect()
    }

    pub fn normalize(x: &Tensor) -> candle_core::Result<Tensor> {
        let norm = x
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        x.broadcast_div(&norm)
    }
}
