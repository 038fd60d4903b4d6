//! The sentence encoder: model folders, tokenisation, the BERT forward pass, and the
//! dedicated encoder thread that async code reaches through a bounded channel.

pub mod amx;
pub mod bert;
pub mod config;
pub mod cpu;
pub mod e5s1;
#[cfg(feature = "cuda")]
pub mod fused;
pub mod gemm;
pub mod hub;
pub mod ops;
pub mod packed;
pub mod qlinear;
pub mod random;
pub mod split;
pub mod tokenize;
pub mod unigram;
pub mod worker;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::{ModelSpec, Pooling};
pub use tokenize::{TextTokenizer, Tokens};

/// Errors that stop the encoder as a whole (bad model folder, device failure).
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("model file {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("{0}")]
    Resolve(String),
    #[error("inference failed: {0}")]
    Inference(#[from] candle_core::Error),
    #[error("the encoder thread has stopped")]
    Stopped,
}

/// Errors that concern one input only; the rest of its batch goes on. All are permanent:
/// the same text fails the same way on a retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    #[error("text is empty or has only whitespace/control characters")]
    EmptyText,
    #[error("tokenizer failed: {0}")]
    Tokenize(String),
}

impl ItemError {
    /// Short, stable label for metrics and dead-letter headers.
    pub fn reason(&self) -> &'static str {
        match self {
            ItemError::EmptyText => "empty_text",
            ItemError::Tokenize(_) => "tokenize_failed",
        }
    }
}

/// Turns token id sequences into sentence vectors. Synchronous on purpose: it runs on its
/// own thread (see [`worker`]); async code never calls it directly.
pub trait Encoder: Send + 'static {
    fn dim(&self) -> usize;
    /// One vector per input, in input order.
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError>;

    /// As [`Encoder::embed`], calling `between` at points where other work may run on the
    /// same model (between transformer layers); the encoder thread answers queries there.
    fn embed_yielding(
        &self,
        batch: &[&[u32]],
        between: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let v = self.embed(batch)?;
        between();
        Ok(v)
    }
}

/// How the f32 linear layers multiply on the CPU; the names are PyTorch's
/// (`torch.set_float32_matmul_precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum F32Matmul {
    /// Where the processor has AMX-BF16 (Intel Xeon since Sapphire Rapids), each f32
    /// split into two bf16 and multiplied as three bf16 tile products summed in f32
    /// (`split`: ~16 significant bits a product, f32 sums; KLUE-STS and KorSTS Spearman
    /// unchanged to 4 decimals, embeddings within cosine 0.99999999 of "highest").
    /// Elsewhere the same as `Highest`.
    #[default]
    High,
    /// f32 products everywhere (the AVX-512/AVX2 kernels of `gemm`).
    Highest,
    /// Where the processor has AMX-BF16, one bf16 product per f32 product (bf16's 8
    /// significant bits, sums in f32: PyTorch's "medium"); opt-in, check quality with
    /// `streambed eval`. Elsewhere the same as `Highest`.
    Medium,
}

impl F32Matmul {
    /// The bf16 products the split kernel runs for this setting on this processor;
    /// `None`: f32 products (`gemm`).
    pub fn split_products(self) -> Option<split::Products> {
        let products = match self {
            F32Matmul::High => split::Products::Three,
            F32Matmul::Medium => split::Products::One,
            F32Matmul::Highest => return None,
        };
        split::available().then_some(products)
    }
}

/// The kernel this processor runs the linear layers with under `opts` (for benchmark
/// lines and logs): `bf16x3-amx`, `f32-avx512`, `int8-amx`, `int8-vnni`, … or `candle`.
pub fn cpu_kernel(opts: &EncoderOptions) -> String {
    match (opts.device, opts.precision) {
        (DeviceKind::Cpu, Precision::Int8) => format!("int8-{}", qlinear::Kernel::detect().name()),
        (DeviceKind::Cpu, Precision::F32) => match opts.f32_matmul.split_products() {
            Some(split::Products::Three) => "bf16x3-amx".to_string(),
            Some(split::Products::One) => "bf16-amx".to_string(),
            None => format!("f32-{}", gemm::isa().name()),
        },
        _ => "candle".to_string(),
    }
}

/// Where the model runs and in which float type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
    /// CPU only: int8 linear layers (weights per channel, activations per row), the rest
    /// f32. Faster; costs a little accuracy (docs/PERFORMANCE.md).
    Int8,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
            // Loaded as f32, then the linear layers are quantized.
            Precision::Int8 => DType::F32,
        }
    }
    /// Why this float type cannot run on `device`, with the fix; `None` when it can. One
    /// rule for the settings check (before any work) and the encoder (the CLI's flags).
    pub fn unsupported_on(self, device: DeviceKind) -> Option<&'static str> {
        match (self, device) {
            (Precision::F16, DeviceKind::Cpu) => Some(
                "= \"f16\" needs model.device = \"cuda\"; on CPU use \"f32\", \"int8\" or \"bf16\"",
            ),
            (Precision::Int8, DeviceKind::Cuda) => {
                Some("= \"int8\" is a CPU path; with model.device = \"cuda\" use \"f16\"")
            }
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// What the encoder needs to be built, besides the folder.
#[derive(Debug, Clone)]
pub struct EncoderOptions {
    pub device: DeviceKind,
    pub precision: Precision,
    /// How f32 linear layers multiply on the CPU.
    pub f32_matmul: F32Matmul,
    /// Inputs per forward pass; larger batches are split after sorting by length.
    pub max_batch: usize,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self {
            device: DeviceKind::Cpu,
            precision: Precision::F32,
            f32_matmul: F32Matmul::High,
            max_batch: 32,
        }
    }
}

/// A loaded BERT sentence encoder.
pub struct BertEncoder {
    model: bert::Bert,
    pooling: Pooling,
    normalize: bool,
    dim: usize,
    max_batch: usize,
}

fn device_for(kind: DeviceKind) -> Result<Device, EmbedError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => {
            if !cfg!(feature = "cuda") {
                return Err(EmbedError::Resolve(
                    "model.device = \"cuda\" needs a build with `--features cuda`; use \"cpu\" or rebuild"
                        .into(),
                ));
            }
            // A stream of its own per loaded model, so that several copies can run side by
            // side, one batch's kernel launches overlapping another's execution.
            let device = Device::new_cuda_with_stream(0).map_err(EmbedError::Inference)?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(d) = &device {
                // cudarc records two events per allocation and launch by default, to order
                // work across streams. Each model copy only ever uses its own stream, so
                // the events are pure overhead.
                // SAFETY: no tensor of this device is used from another stream.
                unsafe { d.disable_event_tracking() };
            }
            Ok(device)
        }
    }
}

impl BertEncoder {
    pub fn load(spec: &ModelSpec, opts: &EncoderOptions) -> Result<Self, EmbedError> {
        if let Some(why) = opts.precision.unsupported_on(opts.device) {
            return Err(EmbedError::Resolve(format!("model.dtype {why}")));
        }
        let device = device_for(opts.device)?;
        if opts.precision == Precision::Int8 && !qlinear::fast() {
            tracing::warn!(
                "model.dtype = \"int8\": this processor has neither AVX2 nor AVX512-VNNI, so \
                 the int8 layers run a portable loop that is slower than f32; set \
                 model.dtype = \"f32\""
            );
        }
        let dtype = opts.precision.dtype();
        let is_safetensors = spec.weights.extension().is_some_and(|e| e == "safetensors");
        let vb = if is_safetensors {
            // SAFETY: the file is mapped read-only; the folder must not change while loaded,
            // as with every memory-mapped model.
            unsafe { VarBuilder::from_mmaped_safetensors(&[&spec.weights], dtype, &device)? }
        } else {
            VarBuilder::from_pth(&spec.weights, dtype, &device)?
        };
        let model =
            bert::Bert::load(vb, &spec.bert, opts.precision, opts.f32_matmul).map_err(|e| {
                EmbedError::Model {
                    path: spec.weights.clone(),
                    reason: e.to_string(),
                }
            })?;
        Ok(Self {
            model,
            pooling: spec.pooling,
            normalize: spec.normalize,
            dim: spec.bert.hidden_size,
            max_batch: opts.max_batch.max(1),
        })
    }

    /// One forward pass: packed (no padding) where the model can (f32 on the CPU), padded
    /// otherwise (a GPU, where the fused kernels and cuBLAS want rectangular batches; bf16
    /// on the CPU, which our f32 attention op does not take).
    fn run_batch(
        &self,
        seqs: &[&[u32]],
        between: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        if !self.model.packs() {
            return self.run_padded(seqs, between);
        }
        self.vectors(
            self.model
                .forward_packed_with(seqs, self.pooling, between)?,
        )
    }

    /// Pooled `(sequences, hidden)` to vectors, normalised if the folder asks for it.
    fn vectors(&self, mut pooled: Tensor) -> Result<Vec<Vec<f32>>, EmbedError> {
        if self.normalize {
            pooled = bert::Bert::normalize(&pooled)?;
        }
        Ok(pooled.to_vec2::<f32>()?)
    }

    /// The padded forward pass (the GPU's) on whatever device the model is on, in input
    /// order: lets the CPU check it against the packed one.
    pub fn embed_padded(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.run_padded(seqs, &mut || {})
    }

    fn run_padded(
        &self,
        seqs: &[&[u32]],
        between: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * len);
        let mut mask = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(0u32, len - s.len()));
            mask.extend(std::iter::repeat_n(1u8, s.len()));
            mask.extend(std::iter::repeat_n(0u8, len - s.len()));
        }
        let device = self.model.device();
        let ids = Tensor::from_vec(ids, (seqs.len(), len), device)?;
        let mask = Tensor::from_vec(mask, (seqs.len(), len), device)?;
        self.vectors(
            self.model
                .forward_pooled_with(&ids, &mask, self.pooling, between)?,
        )
    }
}

impl Encoder for BertEncoder {
    fn dim(&self) -> usize {
        self.dim
    }

    /// Sorts the inputs by length so each forward pass pads little, runs them in chunks of
    /// `max_batch`, and returns the vectors in input order.
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_yielding(batch, &mut || {})
    }

    fn embed_yielding(
        &self,
        batch: &[&[u32]],
        between: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch[i].len());
        let mut out = vec![Vec::new(); batch.len()];
        for chunk in order.chunks(self.max_batch) {
            let seqs: Vec<&[u32]> = chunk.iter().map(|&i| batch[i]).collect();
            for (&i, v) in chunk.iter().zip(self.run_batch(&seqs, between)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

/// Model identity for logs, metrics and the store's collection check.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub dim: usize,
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_seq_length: usize,
    pub device: DeviceKind,
    pub precision: Precision,
}

/// A model ready to use: the tokenizer (cheap to clone, usable from any thread) and the
/// encoder (to be moved onto its thread).
pub struct LoadedModel {
    pub tokenizer: TextTokenizer,
    pub encoder: BertEncoder,
    pub info: ModelInfo,
}

/// Resolves `model` (a folder or a hub id), reads it and loads the weights.
pub fn load_model(
    model: &str,
    prefix: &str,
    opts: &EncoderOptions,
) -> Result<LoadedModel, EmbedError> {
    let dir = hub::resolve(model)?;
    let spec = ModelSpec::read(&dir)?;
    let tokenizer = TextTokenizer::load(&dir, spec.max_seq_length, prefix)?;
    let encoder = BertEncoder::load(&spec, opts)?;
    let info = ModelInfo {
        name: model.to_string(),
        dim: spec.bert.hidden_size,
        pooling: spec.pooling,
        normalize: spec.normalize,
        max_seq_length: spec.max_seq_length,
        device: opts.device,
        precision: opts.precision,
    };
    Ok(LoadedModel {
        tokenizer,
        encoder,
        info,
    })
}

/// Cosine similarity of two vectors (not assumed normalised).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        dot += (*x as f64) * (*y as f64);
        na += (*x as f64) * (*x as f64);
        nb += (*y as f64) * (*y as f64);
    }
    (dot / (na.sqrt() * nb.sqrt()).max(1e-12)) as f32
}
