//! OPT's tokenizer (GPT-2 byte-level BPE, fairseq id order) through the pure-Rust `tokenizers`
//! crate, with BOS `</s>` prepended as Hugging Face does and incremental decoding for streaming.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// The BOS / EOS token of OPT, `</s>`.
pub const BOS_TOKEN_ID: u32 = 2;
/// The padding token of OPT, `<pad>`.
pub const PAD_TOKEN_ID: u32 = 1;

/// OPT's tokenizer.
#[derive(Clone)]
pub struct OptTokenizer {
    inner: Tokenizer,
    source: PathBuf,
    /// Whether `inner`'s post-processor already prepends `</s>` (OPT's tokenizer.json does).
    adds_bos: bool,
    /// `inner.get_vocab_size(true)`, cached: the crate computes it by building the whole vocab.
    vocab_size: usize,
}

impl std::fmt::Debug for OptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OptTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn tok_err(context: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        context: context.display().to_string(),
        msg: e.to_string(),
    }
}

impl OptTokenizer {
    /// Loads the tokenizer of a model folder: `tokenizer.json`, or else `vocab.json` plus
    /// `merges.txt` (GPT-2 byte-level BPE).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_file(json);
        }
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        if vocab.exists() && merges.exists() {
            return Self::from_vocab_merges(&vocab, &merges);
        }
        Err(Error::MissingFile {
            what: "tokenizer (tokenizer.json, or vocab.json + merges.txt)",
            path: dir.to_path_buf(),
        })
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::MissingFile {
                what: "tokenizer.json",
                path: path.to_path_buf(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        Self::wrap(inner, path)
    }

    /// Builds the byte-level BPE tokenizer from `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let bpe = BPE::from_file(&vocab.display().to_string(), &merges.display().to_string())
            .build()
            .map_err(|e| tok_err(vocab, e))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // As in OPT's tokenizer.json: only <pad> and </s> are added (special) tokens; "<s>" and
        // "<unk>" in text are split by BPE like any other text.
        inner.add_special_tokens(&[
            AddedToken::from("<pad>", true).normalized(true),
            AddedToken::from("</s>", true).normalized(true),
        ]);
        Self::wrap(inner, vocab)
    }

    fn wrap(inner: Tokenizer, source: &Path) -> Result<Self> {
        let probe = inner.encode("", true).map_err(|e| tok_err(source, e))?;
        let adds_bos = probe.get_ids().first() == Some(&BOS_TOKEN_ID);
        let vocab_size = inner.get_vocab_size(true);
        Ok(OptTokenizer {
            inner,
            source: source.to_path_buf(),
            adds_bos,
            vocab_size,
        })
    }

    /// Number of ids the tokenizer can produce (50265 for OPT). Token ids at or above this have
    /// no text; generation never samples them.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Encodes `text` as OPT expects: `</s>` (id 2) first, then the BPE ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| tok_err(&self.source, e))?;
        let mut ids = enc.get_ids().to_vec();
        if !self.adds_bos {
            ids.insert(0, BOS_TOKEN_ID);
        }
        Ok(ids)
    }

    /// Encodes `text` without BOS (for text appended to an existing sequence).
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, dropping special tokens (`</s>`, `<pad>`) and ids without text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let limit = self.vocab_size() as u32;
        let ids: Vec<u32> = ids.iter().copied().filter(|&id| id < limit).collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// Decodes ids to text keeping special tokens (`</s>` and `<pad>` appear as text).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        let limit = self.vocab_size() as u32;
        let ids: Vec<u32> = ids.iter().copied().filter(|&id| id < limit).collect();
        self.inner
            .decode(&ids, false)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// A fresh incremental decoder for one streamed sequence.
    pub fn stream_decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder::default()
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Turns a stream of token ids into a stream of text pieces, holding back bytes of a character
/// that a later token completes (byte-level BPE splits multi-byte characters).
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds one token; returns the new text it completes (possibly empty).
    pub fn step(&mut self, tokenizer: &OptTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end of the stream (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self, tokenizer: &OptTokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
