//! The encoder with real weights: sentence-transformers parity, KLUE-STS quality, Korean
//! edge cases (past 512 tokens, unspaced, emoji, mixed scripts), and the 768-dimension
//! klue/bert-base-shaped folder (vocab.txt tokenizer path).

use std::path::PathBuf;

use streambed::embed::{self, cosine, Encoder, EncoderOptions, ItemError, LoadedModel, Precision};

fn models() -> PathBuf {
    std::env::var_os("STREAMBED_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"))
}

fn load(name: &str, prefix: &str) -> LoadedModel {
    load_as(name, prefix, Precision::F32)
}

fn load_as(name: &str, prefix: &str, precision: Precision) -> LoadedModel {
    let dir = models().join(name);
    assert!(
        dir.exists(),
        "{} missing: run scripts/fetch-models.sh",
        dir.display()
    );
    let opts = EncoderOptions {
        precision,
        ..EncoderOptions::default()
    };
    embed::load_model(dir.to_str().unwrap(), prefix, &opts).unwrap()
}

/// Korean, emoji and mixed scripts, code-switching, text past 512 tokens, 1,400 Hangul
/// characters without a space, and one word (last: some tests embed it alone too).
fn edge_texts() -> Vec<String> {
    vec![
        "남자가 기타를 치고 있다".to_string(),
        "한국어 문장 😀 東京 café".to_string(),
        "KLUE-STS 데이터셋으로 evaluation 합니다 🚀🚀".to_string(),
        "대한민국의 수도는 서울이다. ".repeat(200),
        "가나다라마바사아자차카타파하".repeat(100),
        "짧다".to_string(),
    ]
}

fn embed_texts(m: &LoadedModel, texts: &[&str]) -> Vec<Vec<f32>> {
    let toks: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| m.tokenizer.tokenize(t).unwrap().ids)
        .collect();
    let refs: Vec<&[u32]> = toks.iter().map(Vec::as_slice).collect();
    m.encoder.embed(&refs).unwrap()
}

#[test]
fn minilm_reference_pair() {
    let m = load("all-minilm-l6-v2", "");
    let v = embed_texts(
        &m,
        &["A man is eating food.", "A man is eating a piece of bread."],
    );
    let c = cosine(&v[0], &v[1]);
    assert!((c - 0.7553).abs() < 0.001, "cosine {c}");
    assert_eq!(v[0].len(), 384);
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-4,
        "modules.json asks for Normalize: norm {norm}"
    );
}

#[test]
fn vectors_match_sentence_transformers() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/st_reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let sentences: Vec<&str> = fixture["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for (name, reference) in fixture["models"].as_object().unwrap() {
        let m = load(name, reference["prefix"].as_str().unwrap());
        assert_eq!(
            m.info.max_seq_length as u64,
            reference["max_seq_length"].as_u64().unwrap(),
            "{name}: max_seq_length"
        );
        let ours = embed_texts(&m, &sentences);
        for (i, (a, b)) in ours
            .iter()
            .zip(reference["vectors"].as_array().unwrap())
            .enumerate()
        {
            let b: Vec<f32> = b
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let c = cosine(a, &b);
            assert!(
                c >= 0.999,
                "{name} sentence {i}: cosine {c} to sentence-transformers"
            );
        }
    }
}

#[test]
fn e5_small_klue_sts_dev_quality() {
    let m = load("multilingual-e5-small", "query: ");
    let pairs = streambed::sts::load_pairs(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/klue-sts/klue-sts-v1.1_dev.json"),
    )
    .unwrap();
    let r = streambed::commands::evaluate(&m, &pairs, 32).unwrap();
    assert_eq!(r.pairs, 519);
    assert!(r.spearman >= 0.77, "KLUE-STS dev Spearman {}", r.spearman);
}

#[test]
fn korean_edge_cases() {
    let m = load("multilingual-e5-small", "passage: ");
    // Past 512 tokens: cut, never an error.
    let long = "대한민국의 수도는 서울이다. ".repeat(200);
    let t = m.tokenizer.tokenize(&long).unwrap();
    assert!(t.truncated);
    assert_eq!(t.ids.len(), 512);
    // 100k characters without a space: bounded work, truncated.
    let unspaced = "가나다라마바사아자차카타파하".repeat(7200);
    let t = m.tokenizer.tokenize(&unspaced).unwrap();
    assert!(t.truncated && t.ids.len() == 512);
    // Emoji, mixed scripts, NFD input (normalised to NFC first: same tokens as NFC).
    let nfc = "한국어 문장 😀 東京 café";
    let nfd: String = unicode_normalization::UnicodeNormalization::nfd(nfc).collect();
    assert_ne!(nfc, nfd);
    assert_eq!(
        m.tokenizer.tokenize(nfc).unwrap().ids,
        m.tokenizer.tokenize(&nfd).unwrap().ids
    );
    // Nothing to embed: a per-item error.
    for empty in ["", "   \n\t", "\u{7}\u{0}"] {
        assert_eq!(
            m.tokenizer.tokenize(empty).unwrap_err(),
            ItemError::EmptyText,
            "{empty:?}"
        );
    }
    let v = embed_texts(&m, &[&long, &unspaced, nfc, "짧다"]);
    for x in &v {
        assert_eq!(x.len(), 384);
        assert!(x.iter().all(|f| f.is_finite()));
    }
}

/// The klue/bert-base configuration: 768 dimensions, vocab.txt WordPiece (no
/// tokenizer.json), no Normalize module. Padding must not change a vector.
#[test]
fn klue_bert_base_shape_768_dims_and_padding_invariance() {
    let m = load("klue-bert-base-random", "");
    assert_eq!(m.info.dim, 768);
    assert!(!m.info.normalize);
    let t = m.tokenizer.tokenize("한국어 문장입니다").unwrap();
    assert_eq!(
        t.ids.first(),
        Some(&2),
        "[CLS] first, as klue's vocabulary orders it"
    );
    assert!(
        !t.ids.contains(&1),
        "Hangul syllables are in the vocabulary, no [UNK]"
    );
    let short = "짧은 문장";
    let alone = embed_texts(&m, &[short]).remove(0);
    let batched = embed_texts(
        &m,
        &[&"아주 긴 문장 ".repeat(40), short, "중간 길이의 문장입니다"],
    );
    assert_eq!(alone.len(), 768);
    let c = cosine(&alone, &batched[1]);
    assert!(c > 0.99999, "padding changed the vector: cosine {c}");
    let diff: f32 = alone
        .iter()
        .zip(&batched[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-3, "max abs difference {diff}");
}

/// `model.dtype = "int8"`: the int8 linear layers stay close to f32 on Korean inputs of
/// every kind (past 512 tokens, unspaced, emoji, mixed scripts), padding still changes
/// nothing, and KLUE-STS dev Spearman moves by less than 0.005 (the bar for a
/// lower-precision path).
#[test]
fn int8_stays_close_to_f32_and_keeps_klue_sts_quality() {
    let f32m = load_as("multilingual-e5-small", "query: ", Precision::F32);
    let int8 = load_as("multilingual-e5-small", "query: ", Precision::Int8);
    let owned = edge_texts();
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let a = embed_texts(&f32m, &texts);
    let b = embed_texts(&int8, &texts);
    let mut worst = 1f32;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let c = cosine(x, y);
        assert!(c >= 0.98, "text {i}: int8 vs f32 cosine {c}");
        worst = worst.min(c);
    }
    eprintln!("int8 vs f32: lowest cosine {worst:.5}");
    // all-MiniLM-L6-v2 has full-precision f32 weights (e5's were 4-bit): the reference
    // pair keeps its similarity, and int8 vectors stay close to f32 ones.
    let mini32 = load_as("all-minilm-l6-v2", "", Precision::F32);
    let mini8 = load_as("all-minilm-l6-v2", "", Precision::Int8);
    let pair = ["A man is eating food.", "A man is eating a piece of bread."];
    let (x, y) = (embed_texts(&mini32, &pair), embed_texts(&mini8, &pair));
    let c = cosine(&y[0], &y[1]);
    assert!((c - 0.7553).abs() < 0.003, "MiniLM int8 reference pair {c}");
    for (a, b) in x.iter().zip(&y) {
        assert!(cosine(a, b) >= 0.99, "MiniLM int8 vs f32 {}", cosine(a, b));
    }

    let alone = embed_texts(&int8, &["짧다"]).remove(0);
    let c = cosine(&alone, &b[5]);
    // Not bit-equal as in f32: the attention matmuls sum in a batch-dependent order, and a
    // last-bit difference can flip an activation's rounding to the next int8 step.
    assert!(c > 0.9999, "int8: padding changed the vector: cosine {c}");

    let pairs = streambed::sts::load_pairs(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/klue-sts/klue-sts-v1.1_dev.json"),
    )
    .unwrap();
    let full = streambed::commands::evaluate(&f32m, &pairs, 32).unwrap();
    let quant = streambed::commands::evaluate(&int8, &pairs, 32).unwrap();
    eprintln!(
        "KLUE-STS dev Spearman: f32 {:.4}, int8 {:.4}",
        full.spearman, quant.spearman
    );
    assert!(
        (full.spearman - quant.spearman).abs() <= 0.005,
        "int8 moved KLUE-STS dev Spearman from {:.4} to {:.4}",
        full.spearman,
        quant.spearman
    );
}

/// Our compact Unigram model (src/embed/unigram.rs) against the `tokenizers` crate's own,
/// on the same tokenizer.json: identical ids for every sentence of KorSTS train and dev and
/// KLUE-STS dev, and for hostile text (unspaced Hangul past 512 tokens, emoji, mixed
/// scripts, symbols, characters outside the vocabulary). Memory: `cargo run --release
/// --example load_memory -- models/multilingual-e5-small`.
#[test]
fn compact_unigram_matches_the_tokenizers_crate() {
    let dir = models().join("multilingual-e5-small");
    let ours = embed::TextTokenizer::load(&dir, 512, "").unwrap();
    let mut theirs = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    theirs
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: 512,
            ..Default::default()
        }))
        .unwrap();
    theirs.with_padding(None);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets");
    let mut texts = Vec::new();
    for f in [
        "korsts/sts-train.tsv",
        "korsts/sts-dev.tsv",
        "klue-sts/klue-sts-v1.1_dev.json",
    ] {
        let pairs = streambed::sts::load_pairs(&root.join(f)).unwrap();
        texts.extend(streambed::sts::sentences(&pairs));
    }
    let hostile = [
        "가나다라마바사아자차카타파하".repeat(300),
        "대한민국의수도는서울이고인구는약구백만명이다".repeat(40),
        "한국어 문장 😀👩‍👩‍👧‍👦 東京 café naïve Ελληνικά العربية 🇰🇷".to_string(),
        "ㄱㄴㄷ ㅏㅑㅓ 뷁 똠방각하 햏 ꥠꥡ 𠜎𠜱 \u{1F9CC} ⌘⌥ ∮∑ ①②".to_string(),
        "URL https://example.com/a?b=1&c=한글 e-mail test@example.co.kr #해시태그 @멘션"
            .to_string(),
        "  앞뒤   공백   여러 칸  \t탭\n줄바꿈  ".to_string(),
        "1234567890 ３４５ ＡＢＣ ｶﾀｶﾅ".to_string(),
    ];
    texts.extend(hostile.iter().cloned());
    let mut checked = 0;
    for t in &texts {
        let nfc: String = unicode_normalization::UnicodeNormalization::nfc(t.as_str()).collect();
        let want = theirs
            .encode(nfc.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        let got = ours.tokenize(t).unwrap().ids;
        assert_eq!(got, want, "different ids for {t:?}");
        checked += 1;
    }
    assert!(checked > 14_000, "{checked} texts");

    eprintln!("{checked} texts: identical ids");
}

/// The CPU runs a batch packed (no padding, attention per sentence); the GPU runs it padded
/// with a mask. Both give the same vectors, for every pooling the folders use, on a batch
/// of very different lengths (1 token of text to past 512).
#[test]
fn packed_and_padded_forward_passes_agree() {
    for (name, prefix) in [
        ("klue-bert-base-random", ""),
        ("multilingual-e5-small", "query: "),
    ] {
        let m = load(name, prefix);
        let long = "긴 문장을 여러 번 반복합니다. ".repeat(120);
        let texts = [
            "짧다",
            long.as_str(),
            "한국어 문장 😀 東京 café",
            "남자가 기타를 치고 있다",
        ];
        let toks: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| m.tokenizer.tokenize(t).unwrap().ids)
            .collect();
        assert_eq!(toks[1].len(), 512);
        let refs: Vec<&[u32]> = toks.iter().map(Vec::as_slice).collect();
        let packed = m.encoder.embed(&refs).unwrap();
        let padded = m.encoder.embed_padded(&refs).unwrap();
        for (i, (a, b)) in packed.iter().zip(&padded).enumerate() {
            let c = cosine(a, b);
            assert!(c > 0.99999, "{name} text {i}: packed vs padded cosine {c}");
        }
    }
}

/// bf16 on the CPU: the packed pass is f32 only, so bf16 takes the padded one; the vectors
/// stay close to f32 ones (an inference error here would stop the worker's pipeline).
#[test]
fn bf16_on_cpu_embeds_close_to_f32() {
    let f32m = load_as("all-minilm-l6-v2", "", Precision::F32);
    let bf16 = load_as("all-minilm-l6-v2", "", Precision::Bf16);
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "한국어 문장 😀 東京 café",
    ];
    let (a, b) = (embed_texts(&f32m, &texts), embed_texts(&bf16, &texts));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let c = cosine(x, y);
        eprintln!("text {i}: bf16 vs f32 cosine {c:.5}");
        assert!(c >= 0.99, "text {i}: bf16 vs f32 cosine {c}");
    }
}

/// The default f32 matmul ("high": bf16x3 tile products on AMX-BF16 processors) against
/// f32 products ("highest"): the same vectors to within 1e-6 of cosine on Korean, one
/// word, emoji, mixed scripts, long unspaced text and text past 512 tokens, for a real
/// checkpoint (e5-small) and random BERT-base weights; "medium" (one bf16 product)
/// within 1e-4; all bit-identical where the processor has no AMX-BF16 (all run the f32
/// kernels).
#[test]
fn f32_high_matmul_matches_highest() {
    let owned = edge_texts();
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    for (name, prefix) in [
        ("multilingual-e5-small", "query: "),
        ("klue-bert-base-random", ""),
    ] {
        let dir = models().join(name);
        let with = |f32_matmul| {
            let opts = EncoderOptions {
                f32_matmul,
                ..EncoderOptions::default()
            };
            let m = embed::load_model(dir.to_str().unwrap(), prefix, &opts).unwrap();
            embed_texts(&m, &texts)
        };
        let high = with(embed::F32Matmul::High);
        let highest = with(embed::F32Matmul::Highest);
        let medium = with(embed::F32Matmul::Medium);
        let split = embed::cpu_kernel(&EncoderOptions::default()) == "bf16x3-amx";
        for (i, ((a, b), m)) in high.iter().zip(&highest).zip(&medium).enumerate() {
            let c = cosine(a, b);
            assert!(c > 0.999_999, "{name} text {i}: high vs highest cosine {c}");
            let c = cosine(m, b);
            assert!(c > 0.9999, "{name} text {i}: medium vs highest cosine {c}");
            if !split {
                assert_eq!(a, b, "{name} text {i}: no AMX-BF16, so the same kernels");
                assert_eq!(m, b, "{name} text {i}: no AMX-BF16, so the same kernels");
            }
        }
        eprintln!("{name}: f32 high (split: {split}) vs highest agree");
    }
}
