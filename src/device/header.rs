//! The reader of the kernel parameter headers `cuda/*.cuh`: a deliberately small subset of C++, shared by `build.rs`
//! (which generates the Rust side from it, see [`crate::device::params`]) and the layout tests of the crate.
//!
//! A header holds, besides `//` comments, `#pragma once` and `#include` lines (skipped), only these items:
//!
//! ```text
//!   constexpr int NAME = EXPR;                    EXPR: integers, earlier constants of the header, + - * / ( )
//!   struct Name { FIELD; FIELD; ... };             a kernel parameter struct
//!   template <typename T> struct Name { ... };     the same, generic over a storage type T (pointers to T)
//!   extern "C" __global__ void kernel(const Name p);          the kernels taking it, by value
//!   extern "C" __global__ void kernel(const Name<float> p);   (a generic struct, instantiated)
//!   extern "C" __global__ void kernel(const __grid_constant__ Name p);   (a struct holding tensor maps)
//!
//!   FIELD:  int a  |  int64_t b  |  float c  |  double d  |  int e[3]  |  int64_t f[NAME]
//!           const float* x  |  float* y    (pointers to int, int64_t, float, double, __nv_bfloat16 or T)
//!           CUtensorMap m   (cuda.h's TMA descriptor: 128 opaque bytes aligned to 128 (CUDA 13), Rust `TensorMap`)
//! ```
//!
//! A kernel whose struct holds a `CUtensorMap` takes it `const __grid_constant__`: the tensor copies read the map
//! where the launch put it, in the parameter space, which only a grid-constant parameter lets them address.
//!
//! The `//` lines right above an item or field (no blank line between) and a `//` comment after a field on its line
//! are its documentation. Anything else (block comments, `#define`, other types, `unsigned`, `__restrict__`) is an
//! error that names the file and line, so a header cannot mean something the generated Rust side does not.

use std::fmt;

/// A scalar type of the subset: C `int`, `int64_t`, `float`, `double`, `__nv_bfloat16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    /// `int`, Rust `i32`.
    I32,
    /// `int64_t`, Rust `i64`.
    I64,
    /// `float`, Rust `f32`.
    F32,
    /// `double`, Rust `f64`.
    F64,
    /// `__nv_bfloat16` (cuda_bf16.h), Rust `half::bf16`: the GPU's low-precision storage type.
    Bf16,
}

impl Scalar {
    fn from_c(name: &str) -> Option<Scalar> {
        match name {
            "int" => Some(Scalar::I32),
            "int64_t" => Some(Scalar::I64),
            "float" => Some(Scalar::F32),
            "double" => Some(Scalar::F64),
            "__nv_bfloat16" => Some(Scalar::Bf16),
            _ => None,
        }
    }

    /// The Rust type of the same size and representation.
    pub fn rust(self) -> &'static str {
        match self {
            Scalar::I32 => "i32",
            Scalar::I64 => "i64",
            Scalar::F32 => "f32",
            Scalar::F64 => "f64",
            Scalar::Bf16 => "half::bf16",
        }
    }

    /// Size and alignment in bytes (equal for these types on every CUDA target).
    pub fn size(self) -> usize {
        match self {
            Scalar::Bf16 => 2,
            Scalar::I32 | Scalar::F32 => 4,
            Scalar::I64 | Scalar::F64 => 8,
        }
    }
}

/// What a pointer field points at: a scalar, or the struct's storage type parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pointee {
    /// A fixed scalar type.
    Scalar(Scalar),
    /// The template parameter of a generic struct.
    Param,
}

/// The type of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    /// A number.
    Scalar(Scalar),
    /// A device pointer (8 bytes); `mutable` when the kernel may write through it (`float*`, not `const float*`).
    Ptr {
        /// The element type.
        pointee: Pointee,
        /// Whether the pointer is to non-const memory.
        mutable: bool,
    },
    /// cuda.h's `CUtensorMap`: the descriptor of a tensor that TMA copies read (128 bytes, aligned to 128).
    TensorMap,
}

impl FieldType {
    /// Size and alignment in bytes of one element of this type.
    pub fn size(self) -> usize {
        match self {
            FieldType::Scalar(s) => s.size(),
            FieldType::Ptr { .. } => 8,
            FieldType::TensorMap => 128,
        }
    }
}

/// A field of a parameter struct.
#[derive(Clone, Debug)]
pub struct Field {
    /// Its name (also in Rust).
    pub name: String,
    /// Its element type.
    pub ty: FieldType,
    /// `Some(n)` for an array of n elements.
    pub count: Option<usize>,
    /// Its documentation lines.
    pub doc: Vec<String>,
}

/// A parameter struct.
#[derive(Clone, Debug)]
pub struct Struct {
    /// Its name.
    pub name: String,
    /// The name of its storage type parameter, when generic (`template <typename T>`).
    pub param: Option<String>,
    /// Its fields in declaration order.
    pub fields: Vec<Field>,
    /// Its documentation lines.
    pub doc: Vec<String>,
    /// The header line it starts on.
    pub line: usize,
}

/// An integer constant.
#[derive(Clone, Debug)]
pub struct Const {
    /// Its name.
    pub name: String,
    /// Its value (never negative).
    pub value: u64,
    /// Its documentation lines.
    pub doc: Vec<String>,
}

/// A kernel declaration: the kernel takes one parameter struct by value.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The kernel's name (`extern "C"`, so also its name in the compiled module).
    pub name: String,
    /// The struct it takes.
    pub params: String,
    /// The type argument of a generic struct (`Name<float>`).
    pub arg: Option<Scalar>,
    /// Its documentation lines.
    pub doc: Vec<String>,
    /// The header line it is declared on.
    pub line: usize,
}

/// Everything one header declares.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// The constants, in order.
    pub consts: Vec<Const>,
    /// The structs, in order.
    pub structs: Vec<Struct>,
    /// The kernel declarations, in order.
    pub kernels: Vec<Kernel>,
}

/// A header that is not in the subset: the file, the line and what is wrong.
#[derive(Clone, Debug)]
pub struct ParseError {
    /// The header's path as given to [`parse`].
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// What was expected and what was found.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {} (kernel parameter headers use the subset described in src/device/header.rs)",
            self.file, self.line, self.message
        )
    }
}

/// The byte layout of a struct under the C rules (each field at the next multiple of its alignment; the struct
/// aligned to its largest field and its size padded to a multiple of that), which `#[repr(C)]` follows too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `sizeof`.
    pub size: usize,
    /// `alignof`.
    pub align: usize,
    /// `offsetof` of each field, in declaration order.
    pub offsets: Vec<usize>,
}

/// The C layout of `s`.
pub fn layout(s: &Struct) -> Layout {
    let (mut at, mut align) = (0usize, 1usize);
    let mut offsets = Vec::with_capacity(s.fields.len());
    for f in &s.fields {
        let a = f.ty.size();
        at = at.next_multiple_of(a);
        offsets.push(at);
        at += a * f.count.unwrap_or(1);
        align = align.max(a);
    }
    Layout { size: at.next_multiple_of(align), align, offsets }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Num(u64),
    Str(String),
    Punct(char),
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Num(n) => write!(f, "`{n}`"),
            Tok::Str(s) => write!(f, "\"{s}\""),
            Tok::Punct(c) => write!(f, "`{c}`"),
        }
    }
}

/// A token with its line, and the comment lines that document it: those directly above (no blank line between) for
/// the first token of a line, and the comment ending its line for a `;`.
struct Token {
    tok: Tok,
    line: usize,
    doc: Vec<String>,
}

fn tokenize(file: &str, text: &str) -> Result<Vec<Token>, ParseError> {
    let err = |line: usize, message: String| ParseError { file: file.to_string(), line, message };
    let mut out: Vec<Token> = Vec::new();
    // Comment lines waiting for the next item, and the line of the last of them.
    let mut pending: Vec<String> = Vec::new();
    let mut pending_last = 0usize;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let (code, comment) = match raw.find("//") {
            Some(at) => (&raw[..at], Some(raw[at + 2..].trim().to_string())),
            None => (raw, None),
        };
        if code.contains("/*") {
            return Err(err(line, "block comments are not in the subset: use // comments".into()));
        }
        let trimmed = code.trim();
        if trimmed.starts_with('#') {
            if trimmed == "#pragma once" || trimmed.starts_with("#include") {
                continue;
            }
            return Err(err(
                line,
                format!("`{trimmed}`: only #pragma once and #include are allowed; use constexpr int"),
            ));
        }
        if trimmed.is_empty() {
            match comment {
                Some(c) => {
                    if pending_last + 1 != line {
                        pending.clear();
                    }
                    pending.push(c);
                    pending_last = line;
                }
                None => pending.clear(),
            }
            continue;
        }
        let first = out.len();
        let chars: Vec<char> = code.chars().collect();
        let mut k = 0;
        while k < chars.len() {
            let c = chars[k];
            if c.is_whitespace() {
                k += 1;
            } else if c.is_ascii_alphabetic() || c == '_' {
                let start = k;
                while k < chars.len() && (chars[k].is_ascii_alphanumeric() || chars[k] == '_') {
                    k += 1;
                }
                out.push(Token { tok: Tok::Ident(chars[start..k].iter().collect()), line, doc: Vec::new() });
            } else if c.is_ascii_digit() {
                let start = k;
                while k < chars.len() && chars[k].is_ascii_digit() {
                    k += 1;
                }
                let digits: String = chars[start..k].iter().collect();
                if k < chars.len() && (chars[k].is_ascii_alphanumeric() || chars[k] == '.') {
                    return Err(err(line, format!("`{digits}{}...`: only plain decimal integers", chars[k])));
                }
                let n = digits.parse().map_err(|_| err(line, format!("`{digits}` does not fit in 64 bits")))?;
                out.push(Token { tok: Tok::Num(n), line, doc: Vec::new() });
            } else if c == '"' {
                let start = k + 1;
                k = start;
                while k < chars.len() && chars[k] != '"' {
                    k += 1;
                }
                if k == chars.len() {
                    return Err(err(line, "unterminated string".into()));
                }
                out.push(Token { tok: Tok::Str(chars[start..k].iter().collect()), line, doc: Vec::new() });
                k += 1;
            } else if "{}()[]<>;,=*+-/".contains(c) {
                out.push(Token { tok: Tok::Punct(c), line, doc: Vec::new() });
                k += 1;
            } else {
                return Err(err(line, format!("unexpected character `{c}`")));
            }
        }
        if pending_last + 1 == line && out.len() > first {
            out[first].doc = std::mem::take(&mut pending);
        }
        pending.clear();
        if let Some(c) = comment {
            // A comment after code documents what that line ends: a field or a constant.
            if let Some(last) = out[first..].iter_mut().rev().find(|t| t.tok == Tok::Punct(';')) {
                last.doc.push(c);
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    file: &'a str,
    toks: Vec<Token>,
    at: usize,
    header: Header,
    /// Structs of the headers this one includes, which its kernels may take.
    included: &'a [Struct],
}

impl Parser<'_> {
    fn line(&self) -> usize {
        self.toks.get(self.at).or(self.toks.last()).map_or(1, |t| t.line)
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError { file: self.file.to_string(), line: self.line(), message: message.into() })
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|t| &t.tok)
    }

    fn found(&self) -> String {
        self.peek().map_or("the end of the file".to_string(), |t| t.to_string())
    }

    fn next(&mut self, what: &str) -> Result<Tok, ParseError> {
        match self.toks.get(self.at) {
            Some(t) => {
                self.at += 1;
                Ok(t.tok.clone())
            }
            None => self.err(format!("expected {what}, found the end of the file")),
        }
    }

    fn punct(&mut self, c: char) -> Result<(), ParseError> {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.at += 1;
            return Ok(());
        }
        self.err(format!("expected `{c}`, found {}", self.found()))
    }

    fn keyword(&mut self, word: &str) -> Result<(), ParseError> {
        if self.peek() == Some(&Tok::Ident(word.into())) {
            self.at += 1;
            return Ok(());
        }
        self.err(format!("expected `{word}`, found {}", self.found()))
    }

    fn ident(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek() {
            Some(Tok::Ident(s)) => {
                let s = s.clone();
                self.at += 1;
                Ok(s)
            }
            _ => self.err(format!("expected {what}, found {}", self.found())),
        }
    }

    /// The documentation of the token at the current position.
    fn doc(&self) -> Vec<String> {
        self.toks.get(self.at).map(|t| t.doc.clone()).unwrap_or_default()
    }

    /// The trailing comment of the `;` just consumed.
    fn trailing_doc(&self) -> Vec<String> {
        self.toks[self.at - 1].doc.clone()
    }

    fn item(&mut self) -> Result<(), ParseError> {
        let (doc, line) = (self.doc(), self.line());
        match self.peek() {
            Some(Tok::Ident(w)) if w == "constexpr" => {
                self.at += 1;
                self.keyword("int")?;
                let name = self.ident("a constant name")?;
                if self.lookup(&name).is_some() || self.header.structs.iter().any(|s| s.name == name) {
                    return self.err(format!("`{name}` is defined twice"));
                }
                self.punct('=')?;
                let value = self.expr()?;
                self.punct(';')?;
                let value = u64::try_from(value).or_else(|_| self.err(format!("`{name}` = {value} is negative")))?;
                let mut doc = doc;
                doc.extend(self.trailing_doc());
                self.header.consts.push(Const { name, value, doc });
            }
            Some(Tok::Ident(w)) if w == "template" => {
                self.at += 1;
                self.punct('<')?;
                self.keyword("typename")?;
                let param = self.ident("the template parameter's name")?;
                self.punct('>')?;
                self.structure(doc, line, Some(param))?;
            }
            Some(Tok::Ident(w)) if w == "struct" => self.structure(doc, line, None)?,
            Some(Tok::Ident(w)) if w == "extern" => {
                self.at += 1;
                if self.next("\"C\"")? != Tok::Str("C".into()) {
                    self.at -= 1;
                    return self.err("expected extern \"C\"");
                }
                self.keyword("__global__")?;
                self.keyword("void")?;
                let name = self.ident("the kernel's name")?;
                self.punct('(')?;
                self.keyword("const")?;
                let grid_constant = self.peek() == Some(&Tok::Ident("__grid_constant__".into()));
                if grid_constant {
                    self.at += 1;
                }
                let params = self.ident("the parameter struct")?;
                let Some(s) = self.header.structs.iter().chain(self.included).find(|s| s.name == params) else {
                    return self.err(format!(
                        "`{params}` is not a struct declared above in this header or in a header read before it"
                    ));
                };
                let generic = s.param.is_some();
                let maps = s.fields.iter().any(|f| f.ty == FieldType::TensorMap);
                if maps != grid_constant {
                    return self.err(format!(
                        "`{params}` {}: declare the parameter {}",
                        if maps { "holds a CUtensorMap" } else { "holds no CUtensorMap" },
                        if maps { "`const __grid_constant__`" } else { "without __grid_constant__" }
                    ));
                }
                let arg = if self.peek() == Some(&Tok::Punct('<')) {
                    self.at += 1;
                    let t = self.ident("a type argument")?;
                    let Some(t) = Scalar::from_c(&t) else {
                        return self.err(format!(
                            "`{t}` is not a type of the subset (int, int64_t, float, double, __nv_bfloat16)"
                        ));
                    };
                    self.punct('>')?;
                    Some(t)
                } else {
                    None
                };
                if generic != arg.is_some() {
                    return self.err(format!(
                        "`{params}` {} a template: {}",
                        if generic { "is" } else { "is not" },
                        if generic { "give its type argument, e.g. <float>" } else { "drop the type argument" }
                    ));
                }
                self.ident("the parameter's name")?;
                self.punct(')')?;
                self.punct(';')?;
                if self.header.kernels.iter().any(|k| k.name == name) {
                    return self.err(format!("kernel `{name}` is declared twice"));
                }
                let mut doc = doc;
                doc.extend(self.trailing_doc());
                self.header.kernels.push(Kernel { name, params, arg, doc, line });
            }
            _ => {
                return self.err(format!(
                    "expected `constexpr int`, `struct`, `template <typename T> struct` or `extern \"C\" __global__`, \
                     found {}",
                    self.found()
                ))
            }
        }
        Ok(())
    }

    fn structure(&mut self, doc: Vec<String>, line: usize, param: Option<String>) -> Result<(), ParseError> {
        self.keyword("struct")?;
        let name = self.ident("the struct's name")?;
        if self.header.structs.iter().any(|s| s.name == name) || self.lookup(&name).is_some() {
            return self.err(format!("`{name}` is defined twice"));
        }
        self.punct('{')?;
        let mut fields: Vec<Field> = Vec::new();
        while self.peek() != Some(&Tok::Punct('}')) {
            let mut doc = self.doc();
            let is_const = self.peek() == Some(&Tok::Ident("const".into()));
            if is_const {
                self.at += 1;
            }
            let ty_name = self.ident("a field type")?;
            if ty_name == "CUtensorMap" && !is_const {
                let field = self.ident("a field name")?;
                if fields.iter().any(|f| f.name == field) {
                    return self.err(format!("field `{field}` is declared twice"));
                }
                self.punct(';')?;
                doc.extend(self.trailing_doc());
                fields.push(Field { name: field, ty: FieldType::TensorMap, count: None, doc });
                continue;
            }
            let pointee = if Some(&ty_name) == param.as_ref() {
                Pointee::Param
            } else {
                match Scalar::from_c(&ty_name) {
                    Some(s) => Pointee::Scalar(s),
                    None => {
                        return self.err(format!(
                            "`{ty_name}` is not a type of the subset (int, int64_t, float, double, __nv_bfloat16)"
                        ))
                    }
                }
            };
            let ty = if self.peek() == Some(&Tok::Punct('*')) {
                self.at += 1;
                FieldType::Ptr { pointee, mutable: !is_const }
            } else {
                match (pointee, is_const) {
                    (Pointee::Scalar(s), false) => FieldType::Scalar(s),
                    (Pointee::Param, _) => return self.err(format!("`{ty_name}` may only be pointed to")),
                    (_, true) => return self.err("`const` is only for pointers (`const float* x`)"),
                }
            };
            let field = self.ident("a field name")?;
            if fields.iter().any(|f| f.name == field) {
                return self.err(format!("field `{field}` is declared twice"));
            }
            let count = if self.peek() == Some(&Tok::Punct('[')) {
                self.at += 1;
                let n = self.expr()?;
                self.punct(']')?;
                match usize::try_from(n) {
                    Ok(n) if n > 0 => Some(n),
                    _ => return self.err(format!("array `{field}` has {n} elements")),
                }
            } else {
                None
            };
            self.punct(';')?;
            doc.extend(self.trailing_doc());
            fields.push(Field { name: field, ty, count, doc });
        }
        self.punct('}')?;
        self.punct(';')?;
        if fields.is_empty() {
            return Err(ParseError { file: self.file.into(), line, message: format!("struct `{name}` has no fields") });
        }
        self.header.structs.push(Struct { name, param, fields, doc, line });
        Ok(())
    }

    fn lookup(&self, name: &str) -> Option<u64> {
        self.header.consts.iter().find(|c| c.name == name).map(|c| c.value)
    }

    /// EXPR := TERM (('+' | '-') TERM)*
    fn expr(&mut self) -> Result<i128, ParseError> {
        let mut v = self.term()?;
        loop {
            match self.peek() {
                Some(Tok::Punct('+')) => {
                    self.at += 1;
                    v += self.term()?;
                }
                Some(Tok::Punct('-')) => {
                    self.at += 1;
                    v -= self.term()?;
                }
                _ => return Ok(v),
            }
        }
    }

    /// TERM := ATOM (('*' | '/') ATOM)*, integer division truncating toward zero as in C.
    fn term(&mut self) -> Result<i128, ParseError> {
        let mut v = self.atom()?;
        loop {
            match self.peek() {
                Some(Tok::Punct('*')) => {
                    self.at += 1;
                    v *= self.atom()?;
                }
                Some(Tok::Punct('/')) => {
                    self.at += 1;
                    let d = self.atom()?;
                    if d == 0 {
                        return self.err("division by zero");
                    }
                    v /= d;
                }
                _ => return Ok(v),
            }
            if v.unsigned_abs() > u64::MAX as u128 {
                return self.err("constant expression overflows 64 bits");
            }
        }
    }

    /// ATOM := integer | earlier constant | '(' EXPR ')'
    fn atom(&mut self) -> Result<i128, ParseError> {
        match self.next("a number")? {
            Tok::Num(n) => Ok(n.into()),
            Tok::Ident(name) => match self.lookup(&name) {
                Some(v) => Ok(v.into()),
                None => {
                    self.at -= 1;
                    self.err(format!("`{name}` is not a constant defined above in this header"))
                }
            },
            Tok::Punct('(') => {
                let v = self.expr()?;
                self.punct(')')?;
                Ok(v)
            }
            t => {
                self.at -= 1;
                self.err(format!("expected a number, a constant or `(`, found {t}"))
            }
        }
    }
}

/// Parses one header; `file` names it in errors (e.g. `cuda/scan.cuh`).
pub fn parse(file: &str, text: &str) -> Result<Header, ParseError> {
    parse_with(file, text, &[])
}

/// [`parse`] for a header that includes others (`#include "other.cuh"`): its kernels may take a struct of
/// `included`, the structs of the headers read before it. The generated Rust names the struct once, where it is
/// declared.
pub fn parse_with(file: &str, text: &str, included: &[Struct]) -> Result<Header, ParseError> {
    let toks = tokenize(file, text)?;
    let mut p = Parser { file, toks, at: 0, header: Header::default(), included };
    while p.at < p.toks.len() {
        p.item()?;
    }
    Ok(p.header)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"// File comment, not attached (a blank line follows).
#pragma once
#include <stdint.h>

// Threads per block.
constexpr int BLOCK_THREADS = 128;
constexpr int TILE = (BLOCK_THREADS / 32 + 1) * 2 - 1;  // = 9

// What the kernel reads.
// Two lines.
struct Params {
    const float* x;  // input
    // output, written
    float* y;
    int a;
    int64_t b;
    int c;
    float d[TILE];
    double e;
};
extern "C" __global__ void kern(const Params p);

template <typename T>
struct Gen {
    const T* x;
    int n;
};
extern "C" __global__ void gen_f32(const Gen<float> p);
"#;

    #[test]
    fn parses_the_subset_with_docs_and_layout() {
        let h = parse("x.cuh", SAMPLE).unwrap();
        assert_eq!(h.consts.len(), 2);
        assert_eq!((h.consts[0].name.as_str(), h.consts[0].value), ("BLOCK_THREADS", 128));
        assert_eq!(h.consts[0].doc, vec!["Threads per block."]);
        assert_eq!((h.consts[1].value, h.consts[1].doc.clone()), (9, vec!["= 9".to_string()]));
        let s = &h.structs[0];
        assert_eq!(s.doc, vec!["What the kernel reads.", "Two lines."]);
        assert_eq!(s.fields[0].doc, vec!["input"]);
        assert_eq!(s.fields[1].doc, vec!["output, written"]);
        assert_eq!(s.fields[0].ty, FieldType::Ptr { pointee: Pointee::Scalar(Scalar::F32), mutable: false });
        assert_eq!(s.fields[1].ty, FieldType::Ptr { pointee: Pointee::Scalar(Scalar::F32), mutable: true });
        assert_eq!(s.fields[5].count, Some(9));
        // x 0, y 8, a 16, (pad) b 24, c 32, d 36..72, e 72, size 80.
        assert_eq!(layout(s), Layout { size: 80, align: 8, offsets: vec![0, 8, 16, 24, 32, 36, 72] });
        assert_eq!((s.line, h.kernels[0].line), (11, 21));
        assert_eq!(h.kernels[0].params, "Params");
        assert!(h.kernels[0].doc.is_empty());
        assert_eq!(
            [Scalar::I32, Scalar::I64, Scalar::F32, Scalar::F64].map(Scalar::rust),
            ["i32", "i64", "f32", "f64"]
        );
        let g = &h.structs[1];
        assert_eq!(g.param.as_deref(), Some("T"));
        assert_eq!(g.fields[0].ty, FieldType::Ptr { pointee: Pointee::Param, mutable: false });
        assert_eq!(layout(g), Layout { size: 16, align: 8, offsets: vec![0, 8] });
        assert_eq!(h.kernels[1].arg, Some(Scalar::F32));
    }

    /// A tensor map is 128 bytes aligned to 128, and its struct's kernels take it `const __grid_constant__`.
    #[test]
    fn tensor_maps_are_aligned_and_grid_constant() {
        let text = "struct M {\n  int a;\n  CUtensorMap map;\n  float* y;\n};\n\
                    extern \"C\" __global__ void k(const __grid_constant__ M p);";
        let h = parse("m.cuh", text).unwrap();
        assert_eq!(h.structs[0].fields[1].ty, FieldType::TensorMap);
        assert_eq!(layout(&h.structs[0]), Layout { size: 384, align: 128, offsets: vec![0, 128, 256] });
        let plain = text.replace("const __grid_constant__ M", "const M");
        let e = parse("m.cuh", &plain).unwrap_err();
        assert!(e.message.contains("`const __grid_constant__`"), "{e}");
        let e = parse("n.cuh", "struct N { int a; };\nextern \"C\" __global__ void k(const __grid_constant__ N p);")
            .unwrap_err();
        assert!(e.message.contains("holds no CUtensorMap"), "{e}");
    }

    /// Each error names the file and the line of the offending text.
    #[test]
    fn errors_name_file_and_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("struct A {\n  unsigned x;\n};", 2, "`unsigned` is not a type"),
            ("#define X 3", 1, "only #pragma once"),
            ("constexpr int A = B + 1;", 1, "`B` is not a constant"),
            ("constexpr int A = 2 - 3;", 1, "negative"),
            ("struct A {\n  int x\n};", 3, "expected `;`"),
            ("struct A { int x; int x; };", 1, "declared twice"),
            ("extern \"C\" __global__ void k(const B p);", 1, "`B` is not a struct"),
            ("struct A { int x; };\nextern \"C\" __global__ void k(const A<float> p);", 2, "is not a template"),
            ("/* no */", 1, "block comments"),
            ("int x;", 1, "expected `constexpr int`"),
            ("struct A { const int x; };", 1, "only for pointers"),
        ];
        for (text, line, what) in cases {
            let e = parse("cuda/t.cuh", text).unwrap_err();
            let shown = e.to_string();
            assert_eq!(e.line, *line, "{text:?}: {shown}");
            assert!(shown.starts_with(&format!("cuda/t.cuh:{line}: ")) && shown.contains(what), "{text:?}: {shown}");
        }
    }

    /// A kernel may take a struct of a header read before (included), and only then.
    #[test]
    fn kernels_may_take_included_structs() {
        let base = parse("cuda/a.cuh", "struct P { const float* x; int n; };").unwrap();
        let text = "#include \"a.cuh\"\nextern \"C\" __global__ void k(const P p);";
        let h = parse_with("cuda/b.cuh", text, &base.structs).unwrap();
        assert_eq!((h.kernels[0].params.as_str(), h.structs.len()), ("P", 0));
        let e = parse("cuda/b.cuh", text).unwrap_err().to_string();
        assert!(e.contains("`P` is not a struct declared above"), "{e}");
    }
}
