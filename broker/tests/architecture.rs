//! The layout rules of docs/ARCHITECTURE.md, checked on the source itself: arrows point
//! down (no module of a workspace crate imports, directly or through others, a module that
//! imports it back) and no file of `broker/src` grows past 600 lines.
//!
//! A module is a file. Its imports are every path it names (`use` trees, and paths in the
//! code such as `crate::a::b::f()` or `super::x`, or through a name a `use` brought in),
//! resolved to the deepest module file they reach. Tests (`#[cfg(test)] mod tests { … }`)
//! and visibility paths (`pub(in crate::x)`) are not imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose modules must form no cycle.
const CRATES: [&str; 4] = ["broker/src", "storage/src", "loadgen/src", "bench/src"];
/// The longest a file of `broker/src` may be.
const MAX_LINES: usize = 600;

type Module = Vec<String>;

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cycles = Vec::new();
    for krate in CRATES {
        let graph = Graph::of(&root.join(krate));
        for cycle in graph.cycles() {
            let names: Vec<String> = cycle.iter().map(name).collect();
            cycles.push(format!("{krate}: {}", names.join(", ")));
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn no_broker_file_is_over_the_line_limit() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let long: Vec<String> = rust_files(&src)
        .into_iter()
        .filter_map(|path| {
            let lines = std::fs::read_to_string(&path).ok()?.lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", path.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_checker_sees_a_cycle_through_a_use_tree_and_a_path() {
    let a = "use crate::b::{self, Thing};\nfn f() { b::g(); }";
    let b = "pub fn g() { crate::a::h(); }\n// crate::c::nothing\nconst S: &str = \"crate::c\";";
    let graph = Graph::from_sources([(module("a"), a), (module("b"), b), (module("c"), "")]);
    assert_eq!(graph.cycles(), vec![vec![module("a"), module("b")]]);
    let tests_only = "#[cfg(test)]\nmod tests {\n    use crate::a;\n}\n";
    let graph = Graph::from_sources([(module("a"), a), (module("b"), tests_only)]);
    assert!(graph.cycles().is_empty());
}

fn module(path: &str) -> Module {
    path.split('/').map(str::to_owned).collect()
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "lib".into()
    } else {
        module.join("/")
    }
}

/// Modules and the modules each imports.
struct Graph {
    edges: BTreeMap<Module, BTreeSet<Module>>,
}

impl Graph {
    fn of(src: &Path) -> Self {
        let sources: Vec<(Module, String)> = rust_files(src)
            .into_iter()
            .filter_map(|path| {
                let text = std::fs::read_to_string(&path).ok()?;
                Some((module_of(src, &path), text))
            })
            .collect();
        Self::from_sources(sources.iter().map(|(m, t)| (m.clone(), t.as_str())))
    }

    fn from_sources<'a>(sources: impl IntoIterator<Item = (Module, &'a str)>) -> Self {
        let sources: Vec<(Module, &str)> = sources.into_iter().collect();
        let modules: BTreeSet<Module> = sources.iter().map(|(m, _)| m.clone()).collect();
        let mut edges = BTreeMap::new();
        for (module, text) in &sources {
            let imports = imports(module, &strip(text), &modules);
            edges.insert(module.clone(), imports);
        }
        Self { edges }
    }

    /// Every strongly connected set of more than one module (Tarjan), each sorted.
    fn cycles(&self) -> Vec<Vec<Module>> {
        let mut tarjan = Tarjan::default();
        for module in self.edges.keys() {
            if !tarjan.index.contains_key(module) {
                tarjan.visit(module, &self.edges);
            }
        }
        tarjan.components.retain(|c| c.len() > 1);
        for component in &mut tarjan.components {
            component.sort();
        }
        tarjan.components.sort();
        tarjan.components
    }
}

#[derive(Default)]
struct Tarjan {
    next: usize,
    index: BTreeMap<Module, usize>,
    low: BTreeMap<Module, usize>,
    stack: Vec<Module>,
    components: Vec<Vec<Module>>,
}

impl Tarjan {
    fn visit(&mut self, module: &Module, edges: &BTreeMap<Module, BTreeSet<Module>>) {
        self.index.insert(module.clone(), self.next);
        self.low.insert(module.clone(), self.next);
        self.next += 1;
        self.stack.push(module.clone());
        for target in edges.get(module).into_iter().flatten() {
            if !self.index.contains_key(target) {
                self.visit(target, edges);
                let low = self.low[module].min(self.low[target]);
                self.low.insert(module.clone(), low);
            } else if self.stack.contains(target) {
                let low = self.low[module].min(self.index[target]);
                self.low.insert(module.clone(), low);
            }
        }
        if self.low[module] == self.index[module] {
            let mut component = Vec::new();
            while let Some(member) = self.stack.pop() {
                let done = &member == module;
                component.push(member);
                if done {
                    break;
                }
            }
            self.components.push(component);
        }
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are `a/b`; `lib.rs` and `main.rs` the root.
fn module_of(src: &Path, path: &Path) -> Module {
    let relative = path.strip_prefix(src).unwrap_or(path).with_extension("");
    let mut parts: Module = (relative.iter())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        parts.clear();
    }
    parts
}

/// The source without comments, string and character literals, and test modules.
fn strip(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let word_before =
        |i: usize| i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
    while i < bytes.len() {
        let rest = &source[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            let mut depth = 0;
            while i < bytes.len() {
                if source[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if source[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(len) = raw_string_len(rest).filter(|_| !word_before(i)) {
            i += len;
            out.push_str("\"\"");
        } else if bytes[i] == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if let Some(len) = char_literal_len(rest).filter(|_| !word_before(i)) {
            i += len;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    without_test_modules(&out)
}

/// `r"…"`, `r#"…"#`, `br"…"` and the like.
fn raw_string_len(rest: &str) -> Option<usize> {
    let after_b = rest.strip_prefix('b').unwrap_or(rest);
    let after_r = after_b.strip_prefix('r')?;
    let hashes = after_r.len() - after_r.trim_start_matches('#').len();
    let body = after_r[hashes..].strip_prefix('"')?;
    let end = format!("\"{}", "#".repeat(hashes));
    let close = body.find(&end)?;
    Some(rest.len() - body.len() + close + end.len())
}

/// `'x'`, `'\n'`, `b'"'`; not a lifetime (`'a`).
fn char_literal_len(rest: &str) -> Option<usize> {
    let after_b = rest.strip_prefix('b').unwrap_or(rest);
    let body = after_b.strip_prefix('\'')?;
    let len = if let Some(escaped) = body.strip_prefix('\\') {
        1 + escaped.find('\'')?
    } else {
        body.chars().next()?.len_utf8()
    };
    (body[len..].starts_with('\'')).then(|| rest.len() - body.len() + len + 1)
}

fn without_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(start) = rest.find("#[cfg(test)]") {
        let after = &rest[start + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let Some(open) = trimmed.strip_prefix("mod").and_then(|m| m.find('{')) else {
            out.push_str(&rest[..start + 1]);
            rest = &rest[start + 1..];
            continue;
        };
        let body_start = rest.len() - trimmed.len() + 3 + open + 1;
        let mut depth = 1;
        let mut end = body_start;
        for (offset, c) in rest[body_start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = body_start + offset + 1;
                break;
            }
        }
        out.push_str(&rest[..start]);
        rest = &rest[end.max(body_start)..];
    }
    out.push_str(rest);
    out
}

/// The modules `module`'s code names.
fn imports(module: &Module, code: &str, modules: &BTreeSet<Module>) -> BTreeSet<Module> {
    let code = visibility_free(code);
    let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut paths: Vec<Vec<String>> = Vec::new();
    let mut rest = code.as_str();
    let mut plain = String::new();
    while let Some(at) = find_word(rest, "use") {
        plain.push_str(&rest[..at]);
        let tree_start = at + 3;
        let Some(end) = rest[tree_start..].find(';') else {
            break;
        };
        let tree = &rest[tree_start..tree_start + end];
        use_paths(tree, &[], &mut paths, &mut aliases);
        rest = &rest[tree_start + end + 1..];
    }
    plain.push_str(rest);
    paths.extend(code_paths(&plain));
    let mut found = BTreeSet::new();
    for path in paths {
        if let Some(target) = resolve(module, &path, &aliases, modules)
            && &target != module
            && !target.is_empty()
        {
            found.insert(target);
        }
    }
    found
}

fn visibility_free(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("pub(in ") {
        out.push_str(&rest[..at + 3]);
        let close = rest[at..].find(')').map_or(rest.len(), |c| at + c + 1);
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// Where `word` occurs as a whole word.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text[from..].find(word) {
        let at = from + found;
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        let is_ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !is_ident(before) && !is_ident(after) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// The paths of a `use` tree, and the names it brings in.
fn use_paths(
    tree: &str,
    prefix: &[String],
    paths: &mut Vec<Vec<String>>,
    aliases: &mut BTreeMap<String, Vec<String>>,
) {
    for item in split_top_level(tree) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if let Some(open) = item.find('{') {
            let head: Vec<String> = segments(item[..open].trim_end_matches(':'));
            let inner = &item[open + 1..item.rfind('}').unwrap_or(item.len())];
            let prefix: Vec<String> = prefix.iter().cloned().chain(head).collect();
            use_paths(inner, &prefix, paths, aliases);
            continue;
        }
        let (path, alias) = match item.split_once(" as ") {
            Some((path, alias)) => (path.trim(), Some(alias.trim().to_owned())),
            None => (item, None),
        };
        let segs = segments(path);
        let (full, name) = if segs == ["self"] {
            (prefix.to_vec(), alias.or_else(|| prefix.last().cloned()))
        } else {
            let full: Vec<String> = prefix.iter().cloned().chain(segs.clone()).collect();
            (full, alias.or_else(|| segs.last().cloned()))
        };
        if let Some(name) = name {
            aliases.insert(name, full.clone());
        }
        paths.push(full);
    }
}

fn split_top_level(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items
}

fn segments(path: &str) -> Vec<String> {
    (path.split("::").map(str::trim))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every `a::b…` path in code.
fn code_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let starts =
            is_ident(chars[i]) && (i == 0 || (!is_ident(chars[i - 1]) && chars[i - 1] != ':'));
        if !starts {
            i += 1;
            continue;
        }
        let mut path = Vec::new();
        let mut j = i;
        loop {
            let word_start = j;
            while j < chars.len() && is_ident(chars[j]) {
                j += 1;
            }
            path.push(chars[word_start..j].iter().collect::<String>());
            if j + 2 < chars.len()
                && chars[j] == ':'
                && chars[j + 1] == ':'
                && is_ident(chars[j + 2])
            {
                j += 2;
            } else {
                break;
            }
        }
        if path.len() > 1 {
            paths.push(path);
        }
        i = j.max(i + 1);
    }
    paths
}

/// The deepest module file `path` (as named in `module`) reaches.
fn resolve(
    module: &Module,
    path: &[String],
    aliases: &BTreeMap<String, Vec<String>>,
    modules: &BTreeSet<Module>,
) -> Option<Module> {
    let first = path.first()?;
    let full: Vec<String> = match first.as_str() {
        "crate" => path[1..].to_vec(),
        "self" => module
            .iter()
            .cloned()
            .chain(path[1..].iter().cloned())
            .collect(),
        "super" => {
            let mut base = module.clone();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            base.into_iter().chain(rest.iter().cloned()).collect()
        }
        _ => {
            let mut child = module.clone();
            child.push(first.clone());
            if modules.contains(&child) {
                child.into_iter().chain(path[1..].iter().cloned()).collect()
            } else {
                let target = aliases.get(first)?;
                if target.first().is_some_and(|s| s == first) {
                    // An external crate (`use bytes::Bytes`).
                    return None;
                }
                let mut through = target.clone();
                through.extend(path[1..].iter().cloned());
                return resolve(module, &through, &BTreeMap::new(), modules);
            }
        }
    };
    (0..=full.len())
        .rev()
        .map(|n| full[..n].to_vec())
        .find(|candidate| modules.contains(candidate))
}
