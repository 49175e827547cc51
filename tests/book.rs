//! The book's code comes from `examples/` through `{{#include file:anchor}}`, and mdBook includes
//! nothing (silently) for an anchor that does not exist. Every include of every chapter must name a
//! file that exists and, when it names an anchor, one `ANCHOR: name` and one `ANCHOR_END: name`
//! in that file, in that order. Every chapter file must be listed in SUMMARY.md.

use std::path::{Path, PathBuf};

/// `(chapter, line, path relative to the chapter, anchor)` of every include in `book/src`.
fn includes(src: &Path) -> Vec<(PathBuf, usize, String, Option<String>)> {
    let mut out = Vec::new();
    for chapter in chapters(src) {
        let text = std::fs::read_to_string(&chapter).unwrap();
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("{{#include ") {
                let tail = &rest[at + "{{#include ".len()..];
                let end = tail
                    .find("}}")
                    .unwrap_or_else(|| panic!("{}:{}: unclosed include", chapter.display(), n + 1));
                let target = tail[..end].trim();
                let (path, anchor) = match target.split_once(':') {
                    Some((p, a)) => (p.to_string(), Some(a.to_string())),
                    None => (target.to_string(), None),
                };
                out.push((chapter.clone(), n + 1, path, anchor));
                rest = &tail[end..];
            }
        }
    }
    out
}

fn chapters(src: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    v.sort();
    v
}

/// Line numbers of `// ANCHOR: name` and `// ANCHOR_END: name` (or the reason they are unusable).
fn anchor_lines(text: &str, name: &str) -> Result<(usize, usize), String> {
    let find = |marker: &str| -> Result<usize, String> {
        let hits: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim() == format!("// {marker}: {name}"))
            .map(|(i, _)| i + 1)
            .collect();
        match hits.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!("no `// {marker}: {name}`")),
            _ => Err(format!("`// {marker}: {name}` {} times", hits.len())),
        }
    };
    let (start, end) = (find("ANCHOR")?, find("ANCHOR_END")?);
    if start >= end {
        return Err(format!("ANCHOR_END: {name} comes before ANCHOR: {name}"));
    }
    Ok((start, end))
}

#[test]
fn every_include_names_an_existing_file_and_anchor() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src");
    let all = includes(&src);
    assert!(!all.is_empty(), "the book includes no code");
    let mut problems = Vec::new();
    for (chapter, line, path, anchor) in all {
        let file = chapter.parent().unwrap().join(&path);
        let at = format!("{}:{line}", chapter.display());
        let Ok(text) = std::fs::read_to_string(&file) else {
            problems.push(format!("{at}: no file {}", file.display()));
            continue;
        };
        if let Some(name) = anchor {
            match anchor_lines(&text, &name) {
                Ok((start, end)) if end == start + 1 => {
                    problems.push(format!("{at}: anchor {name} in {path} is empty"))
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("{at}: {path}: {e}")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_chapter_is_in_the_summary() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src");
    let summary = std::fs::read_to_string(src.join("SUMMARY.md")).unwrap();
    for chapter in chapters(&src) {
        let name = chapter.file_name().unwrap().to_str().unwrap();
        if name != "SUMMARY.md" {
            assert!(
                summary.contains(&format!("({name})")),
                "{name} is not in SUMMARY.md"
            );
        }
    }
}

#[test]
fn the_anchor_check_catches_missing_reversed_and_repeated_anchors() {
    let text = "// ANCHOR: a\nx\n// ANCHOR_END: a\n// ANCHOR_END: b\n// ANCHOR: b\n// ANCHOR: c\n";
    assert_eq!(anchor_lines(text, "a"), Ok((1, 3)));
    assert!(anchor_lines(text, "b").unwrap_err().contains("before"));
    assert!(
        anchor_lines(text, "c")
            .unwrap_err()
            .contains("no `// ANCHOR_END: c`")
    );
    assert!(
        anchor_lines(text, "z")
            .unwrap_err()
            .contains("no `// ANCHOR: z`")
    );
    let twice = "// ANCHOR: a\n// ANCHOR: a\n// ANCHOR_END: a\n";
    assert!(anchor_lines(twice, "a").unwrap_err().contains("2 times"));
}
