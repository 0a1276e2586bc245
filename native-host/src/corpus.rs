//! Reading a corpus from disk: a UTF-8 text file, or a folder of them (read in name order).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tessera_core::corpus::default_corpus;
use tessera_core::data::Corpus;

/// Loads the corpus at `path`, or the embedded default corpus when `path` is `None`.
pub fn load(path: Option<&Path>, context: usize) -> Result<(Corpus, String)> {
    let Some(path) = path else {
        let text = default_corpus();
        return Ok((
            Corpus::from_text(&text, context)?,
            "embedded default corpus".into(),
        ));
    };
    let meta =
        fs::metadata(path).with_context(|| format!("cannot read corpus {}", path.display()))?;
    let files: Vec<PathBuf> = if meta.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("corpus folder {} holds no files", path.display());
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut docs = Vec::new();
    for f in &files {
        let bytes = fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        docs.push((f.display().to_string(), bytes));
    }
    let corpus = Corpus::from_documents(
        docs.iter().map(|(n, b)| (n.as_str(), b.as_slice())),
        context,
    )?;
    let bytes = corpus.len();
    Ok((
        corpus,
        format!("{} ({} files, {bytes} bytes)", path.display(), files.len()),
    ))
}
