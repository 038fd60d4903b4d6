//! From a query text to the store's query: which searches run (`search.mode`), the query's
//! sparse vector, and how a hybrid search fuses. Shared by `streambed search`, POST
//! /search and `streambed eval --retrieval`, so they rank alike.

use crate::embed::TextTokenizer;
use crate::settings::{FusionKind, SearchMode, SearchSettings, Settings};
use crate::sink::{Fusion, Query, SparseVector};
use crate::sparse::Lexer;

#[derive(Clone)]
pub struct Searcher {
    settings: SearchSettings,
    /// Present when the collection has sparse vectors.
    lexer: Option<Lexer>,
}

impl Searcher {
    pub fn new(s: &Settings, tokenizer: &TextTokenizer) -> Result<Self, String> {
        let lexer = if s.sparse.enabled {
            Some(Lexer::new(&s.sparse, Some(tokenizer))?)
        } else {
            None
        };
        Ok(Self {
            settings: s.search.clone(),
            lexer,
        })
    }

    pub fn with_settings(mut self, settings: SearchSettings) -> Self {
        self.settings = settings;
        self
    }

    pub fn lexer(&self) -> Option<&Lexer> {
        self.lexer.as_ref()
    }

    /// The mode a search runs in: `requested`, else the setting, `auto` resolved. Sparse
    /// and hybrid need sparse vectors.
    pub fn mode(&self, requested: Option<SearchMode>) -> Result<SearchMode, String> {
        let m = requested.unwrap_or(self.settings.mode);
        match (m, self.lexer.is_some()) {
            (SearchMode::Auto, true) => Ok(SearchMode::Hybrid),
            (SearchMode::Auto, false) => Ok(SearchMode::Dense),
            (SearchMode::Sparse | SearchMode::Hybrid, false) => Err(format!(
                "mode {:?} needs sparse vectors, and this worker's collection has none \
                 (sparse.enabled = false); use \"dense\"",
                m.as_str()
            )),
            (m, _) => Ok(m),
        }
    }

    /// Whether a search in `mode` needs the query embedded.
    pub fn needs_dense(mode: SearchMode) -> bool {
        mode != SearchMode::Sparse
    }

    /// The store's query for `text` in a resolved `mode`; `dense` is its embedding (given
    /// when [`needs_dense`](Self::needs_dense)).
    pub fn query(
        &self,
        mode: SearchMode,
        text: &str,
        dense: Option<Vec<f32>>,
        top_k: usize,
    ) -> Query {
        let sparse = || {
            self.lexer
                .as_ref()
                .expect("mode checked against the lexer")
                .query(text)
        };
        match mode {
            SearchMode::Dense | SearchMode::Auto => Query::Dense(dense.expect("dense mode embeds")),
            SearchMode::Sparse => Query::Sparse(sparse()),
            SearchMode::Hybrid => hybrid(
                &self.settings,
                dense.expect("hybrid mode embeds"),
                sparse(),
                top_k,
            ),
        }
    }
}

/// A hybrid query as `s` configures it.
pub fn hybrid(s: &SearchSettings, dense: Vec<f32>, sparse: SparseVector, top_k: usize) -> Query {
    Query::Hybrid {
        dense,
        sparse,
        fusion: match s.fusion {
            FusionKind::Rrf => Fusion::Rrf {
                k: s.rrf_k,
                weights: [s.dense_weight, s.sparse_weight],
            },
            FusionKind::Dbsf => Fusion::Dbsf,
        },
        prefetch: s.prefetch.max(top_k),
    }
}
