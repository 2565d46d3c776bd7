//! Reading `torch.save` files without PyTorch. A pickle is a small stack program; this runs
//! the subset of it that state dicts use and models the few functions they call (rebuilding a
//! tensor from a storage, making an `OrderedDict`). Any other function the file names is kept
//! as an inert placeholder and never called, so a file can at worst fail to load.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Kind, Tensor};

/// Tensors by name from a zip `torch.save` file (PyTorch >= 1.6): `ARCHIVE/data.pkl` and
/// one `ARCHIVE/data/KEY` entry of raw little-endian elements per storage. `None`: a zip
/// without `data.pkl`.
pub fn read_zip(data: &[u8]) -> Result<Option<Vec<(String, Tensor)>>> {
    let entries = zip_entries(data)?;
    let Some(pkl_name) = entries
        .keys()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
    else {
        return Ok(None);
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    if let Some(order) = entries.get(&format!("{prefix}byteorder")) {
        if order.trim_ascii() != b"little" {
            bail!("big-endian files are not supported");
        }
    }
    let mut p = Unpickler::new(entries[pkl_name.as_str()]);
    let root = p.load().context("data.pkl")?;
    let tensors = state_dict(&root)?;
    let blobs: HashMap<String, &[u8]> = p
        .storages
        .keys()
        .filter_map(|k| Some((k.clone(), *entries.get(&format!("{prefix}data/{k}"))?)))
        .collect();
    materialize(tensors, &blobs).map(Some)
}

/// The pickle magic number that opens the pre-1.6 format.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Tensors by name from a `torch.save` file of the format before PyTorch 1.6: pickles of
/// the magic number, the protocol version, system information, the object, the list of
/// storage keys; then each storage as an element count (int64) and its raw elements.
pub fn read_legacy(data: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let mut pos = 0;
    let mut next = |what: &str| -> Result<(Value, HashMap<String, Rc<StorageRef>>)> {
        let mut p = Unpickler::new(&data[pos..]);
        let v = p.load().with_context(|| format!("reading the {what}"))?;
        pos += p.pos;
        Ok((v, p.storages))
    };
    match next("magic number")?.0 {
        Value::BigInt(b) if b == MAGIC => {}
        _ => bail!("not a torch.save file (no magic number)"),
    }
    match next("protocol version")?.0 {
        Value::Int(1001) => {}
        v => bail!("unsupported torch.save protocol version {v:?}"),
    }
    if let Value::Dict(info) = next("system information")?.0 {
        for (k, v) in info.borrow().iter() {
            if let (Value::Str(k), Value::Bool(false)) = (k, v) {
                if k == "little_endian" {
                    bail!("big-endian files are not supported");
                }
            }
        }
    }
    let (root, storages) = next("saved object")?;
    let Value::List(keys) = next("storage keys")?.0 else {
        bail!("the storage key list is missing");
    };
    let mut blobs: HashMap<String, &[u8]> = HashMap::new();
    for key in keys.borrow().iter() {
        let key = match key {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            v => bail!("unexpected storage key {v:?}"),
        };
        let elem = storages
            .get(&key)
            .ok_or_else(|| anyhow!("storage {key} is listed but not used"))?
            .kind
            .elt_size_in_bytes();
        let count = u64::from_le_bytes(slice(data, pos, 8)?.try_into().expect("8 bytes"));
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(elem))
            .ok_or_else(|| anyhow!("storage {key} is too large"))?;
        blobs.insert(key, slice(data, pos + 8, len)?);
        pos += 8 + len;
    }
    materialize(state_dict(&root)?, &blobs)
}

fn slice(data: &[u8], at: usize, len: usize) -> Result<&[u8]> {
    at.checked_add(len)
        .and_then(|end| data.get(at..end))
        .ok_or_else(|| anyhow!("file is truncated"))
}

fn le16(d: &[u8], at: usize) -> Result<u64> {
    Ok(u16::from_le_bytes(slice(d, at, 2)?.try_into().expect("2")) as u64)
}

fn le32(d: &[u8], at: usize) -> Result<u64> {
    Ok(u32::from_le_bytes(slice(d, at, 4)?.try_into().expect("4")) as u64)
}

fn le64(d: &[u8], at: usize) -> Result<u64> {
    Ok(u64::from_le_bytes(slice(d, at, 8)?.try_into().expect("8")))
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| anyhow!("zip offset out of range"))
}

/// The stored (uncompressed) entries of a zip archive, by name, read from its central
/// directory (zip64 included, as PyTorch writes it).
fn zip_entries(d: &[u8]) -> Result<HashMap<String, &[u8]>> {
    if d.len() < 22 {
        bail!("zip file is truncated");
    }
    let lowest = d.len().saturating_sub(22 + 0xFFFF);
    let eocd = (lowest..=d.len() - 22)
        .rev()
        .find(|&i| d[i..i + 4] == *b"PK\x05\x06")
        .ok_or_else(|| anyhow!("zip file has no central directory"))?;
    let mut count = le16(d, eocd + 10)?;
    let mut offset = le32(d, eocd + 16)?;
    if count == 0xFFFF || offset == 0xFFFF_FFFF {
        let locator = eocd
            .checked_sub(20)
            .filter(|&l| d[l..l + 4] == *b"PK\x06\x07")
            .ok_or_else(|| anyhow!("zip64 locator missing"))?;
        let record = to_usize(le64(d, locator + 8)?)?;
        if slice(d, record, 4)? != b"PK\x06\x06" {
            bail!("zip64 directory record missing");
        }
        count = le64(d, record + 32)?;
        offset = le64(d, record + 48)?;
    }
    let mut entries = HashMap::new();
    let mut p = to_usize(offset)?;
    for _ in 0..count {
        if slice(d, p, 4)? != b"PK\x01\x02" {
            bail!("zip central directory is damaged");
        }
        let method = le16(d, p + 10)?;
        let mut compressed = le32(d, p + 20)?;
        let mut uncompressed = le32(d, p + 24)?;
        let mut local = le32(d, p + 42)?;
        let name_len = to_usize(le16(d, p + 28)?)?;
        let extra_len = to_usize(le16(d, p + 30)?)?;
        let comment_len = to_usize(le16(d, p + 32)?)?;
        let name = String::from_utf8_lossy(slice(d, p + 46, name_len)?).into_owned();
        // The zip64 extra field holds, in this order, whichever of the uncompressed size,
        // compressed size and local header offset did not fit in 32 bits.
        let extra = slice(d, p + 46 + name_len, extra_len)?;
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = le16(extra, e)?;
            let len = to_usize(le16(extra, e + 2)?)?;
            if id == 1 {
                let mut q = e + 4;
                let mut wide = |v: &mut u64| -> Result<()> {
                    if *v == 0xFFFF_FFFF {
                        *v = le64(extra, q)?;
                        q += 8;
                    }
                    Ok(())
                };
                wide(&mut uncompressed)?;
                wide(&mut compressed)?;
                wide(&mut local)?;
            }
            e += 4 + len;
        }
        if method != 0 || compressed != uncompressed {
            bail!("zip entry {name} is compressed (torch.save stores its entries)");
        }
        let local = to_usize(local)?;
        if slice(d, local, 4)? != b"PK\x03\x04" {
            bail!("zip entry {name} is damaged");
        }
        let start = local + 30 + to_usize(le16(d, local + 26)?)? + to_usize(le16(d, local + 28)?)?;
        entries.insert(name, slice(d, start, to_usize(compressed)?)?);
        p += 46 + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as its little-endian bytes.
    BigInt(Vec<u8>),
    /// A float or a bytes object (never needed by value).
    Float,
    Str(String),
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A reference to a Python object by module and name.
    Global(Rc<(String, String)>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// The result of calling what we do not model (never called): its name.
    Opaque(Rc<String>),
}

#[derive(Debug)]
pub struct StorageRef {
    key: String,
    kind: Kind,
}

#[derive(Debug)]
pub struct TensorRef {
    storage: Rc<StorageRef>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn tuple(items: Vec<Value>) -> Value {
    Value::Tuple(Rc::new(items))
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" | "UntypedStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    storages: HashMap<String, Rc<StorageRef>>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: vec![],
            marks: vec![],
            memo: HashMap::new(),
            storages: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = slice(self.data, self.pos, n).map_err(|_| anyhow!("pickle is truncated"))?;
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn len(&mut self, n: usize) -> Result<usize> {
        let l = self.uint(n)?;
        usize::try_from(l).map_err(|_| anyhow!("pickle length out of range"))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| anyhow!("pickle is truncated"))?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| anyhow!("pickle stack underflow"))
    }

    fn top(&self) -> Result<&Value> {
        self.stack
            .last()
            .ok_or_else(|| anyhow!("pickle stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("pickle mark missing"))?;
        if at > self.stack.len() {
            bail!("pickle mark out of place");
        }
        Ok(self.stack.split_off(at))
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(String::from_utf8_lossy(b).into_owned()))
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| anyhow!("pickle refers to unknown memo {key}"))?;
        self.push(v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            bail!("pickle dict items are unpaired");
        }
        let Value::Dict(d) = self.top()? else {
            bail!("pickle sets items on a non-dict");
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(l) => l.borrow_mut().extend(items),
            Value::Opaque(_) => {}
            _ => bail!("pickle appends to a non-list"),
        }
        Ok(())
    }

    /// Runs the pickle up to its STOP; returns the object it made.
    fn load(&mut self) -> Result<Value> {
        loop {
            let op = self.byte()?;
            match op {
                0x80 => {
                    self.byte()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b')' => self.push(tuple(vec![])),
                b']' => self.push(Value::List(Rc::default())),
                b'}' => self.push(Value::Dict(Rc::default())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self
                        .stack
                        .len()
                        .checked_sub(n)
                        .ok_or_else(|| anyhow!("pickle stack underflow"))?;
                    let items = self.stack.split_off(at);
                    self.push(tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Rc::default()));
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'N' => self.push(Value::None),
                b'I' => {
                    // Protocol 0 integers, and its booleans "01" / "00".
                    let l = self.line()?;
                    let v = match l.as_str() {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => Value::Int(l.parse().map_err(|_| anyhow!("bad pickle int"))?),
                    };
                    self.push(v);
                }
                b'p' => {
                    let k = self
                        .line()?
                        .parse()
                        .map_err(|_| anyhow!("bad pickle memo"))?;
                    self.memo_put(k)?;
                }
                b'g' => {
                    let k = self
                        .line()?
                        .parse()
                        .map_err(|_| anyhow!("bad pickle memo"))?;
                    self.memo_get(k)?;
                }
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.len(1)?
                    } else {
                        self.len(4)?
                    };
                    let b = self.take(n)?;
                    let v = if n <= 8 {
                        // Little-endian two's complement, sign-extended.
                        let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                            [0xffu8; 8]
                        } else {
                            [0u8; 8]
                        };
                        buf[..n].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(buf))
                    } else {
                        Value::BigInt(b.to_vec())
                    };
                    self.push(v);
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Float);
                }
                b'X' => {
                    let n = self.len(4)?;
                    let v = self.string(n)?;
                    self.push(v);
                }
                0x8c | b'U' => {
                    let n = self.len(1)?;
                    let v = self.string(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.len(8)?;
                    let v = self.string(n)?;
                    self.push(v);
                }
                b'T' => {
                    let n = self.len(4)?;
                    let v = self.string(n)?;
                    self.push(v);
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.len(4)?,
                        b'C' => self.len(1)?,
                        _ => self.len(8)?,
                    };
                    self.take(n)?;
                    self.push(Value::Bytes);
                }
                b'q' => {
                    let k = self.uint(1)?;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.uint(4)?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.uint(1)?;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.uint(4)?;
                    self.memo_get(k)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(Rc::new((module, name))));
                }
                0x93 => {
                    let (Value::Str(name), Value::Str(module)) = (self.pop()?, self.pop()?) else {
                        bail!("pickle global is not named by strings");
                    };
                    self.push(Value::Global(Rc::new((module, name))));
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(&f, &args)?;
                    self.push(v);
                }
                b'b' => {
                    // BUILD: sets attributes (an OrderedDict's `_metadata`); not modelled.
                    self.pop()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(&pid)?;
                    self.push(v);
                }
                _ => bail!(
                    "unsupported pickle opcode 0x{op:02x} at byte {}",
                    self.pos - 1
                ),
            }
        }
    }

    /// Calls a global: only the few a state dict needs; anything else gives a placeholder.
    fn call(&mut self, f: &Value, args: &Value) -> Result<Value> {
        let Value::Global(g) = f else {
            return Ok(Value::Opaque(Rc::new("a call".into())));
        };
        let args: &[Value] = match args {
            Value::Tuple(t) => t,
            _ => &[],
        };
        match (g.0.as_str(), g.1.as_str()) {
            ("collections", "OrderedDict") => {
                let d = Value::Dict(Rc::default());
                if let Some(Value::List(items)) = args.first() {
                    if let Value::Dict(dd) = &d {
                        for item in items.borrow().iter() {
                            if let Value::Tuple(kv) = item {
                                if let [k, v] = kv.as_slice() {
                                    dd.borrow_mut().push((k.clone(), v.clone()));
                                }
                            }
                        }
                    }
                }
                Ok(d)
            }
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => {
                let ints = |v: &Value| -> Result<Vec<i64>> {
                    match v {
                        Value::Tuple(t) => t
                            .iter()
                            .map(|x| match x {
                                Value::Int(i) => Ok(*i),
                                _ => Err(anyhow!("tensor shape is not integers")),
                            })
                            .collect(),
                        _ => bail!("tensor shape is not a tuple"),
                    }
                };
                let [Value::Storage(storage), Value::Int(offset), size, stride, ..] = args else {
                    bail!("malformed tensor record");
                };
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset: *offset,
                    size: ints(size)?,
                    stride: ints(stride)?,
                })))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                Ok(args.first().cloned().unwrap_or(Value::None))
            }
            (m, n) => Ok(Value::Opaque(Rc::new(format!("{m}.{n}")))),
        }
    }

    /// A storage from its persistent id:
    /// `('storage', torch.<T>Storage, key, location, numel[, view])`.
    fn persistent(&mut self, pid: &Value) -> Result<Value> {
        let Value::Tuple(t) = pid else {
            bail!("unsupported persistent id");
        };
        let [Value::Str(tag), Value::Global(ty), key, _location, _numel, rest @ ..] = t.as_slice()
        else {
            bail!("unsupported persistent id");
        };
        if tag != "storage" {
            bail!("unsupported persistent id '{tag}'");
        }
        if !matches!(rest.first(), None | Some(Value::None)) {
            bail!("storage views are not supported");
        }
        let kind = (ty.0 == "torch")
            .then(|| storage_kind(&ty.1))
            .flatten()
            .ok_or_else(|| anyhow!("unsupported storage type {}.{}", ty.0, ty.1))?;
        let key = match key {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            _ => bail!("unsupported storage key"),
        };
        if let Some(s) = self.storages.get(&key) {
            if s.kind != kind {
                bail!("storage {key} is read as two types");
            }
            return Ok(Value::Storage(s.clone()));
        }
        let s = Rc::new(StorageRef {
            key: key.clone(),
            kind,
        });
        self.storages.insert(key, s.clone());
        Ok(Value::Storage(s))
    }
}

/// The name -> tensor entries of a state dict: the saved object itself, or the dict under
/// its "state_dict" or "model" key.
fn state_dict(root: &Value) -> Result<Vec<(String, Rc<TensorRef>)>> {
    let d = match root {
        Value::Dict(d) => d,
        Value::Opaque(what) => bail!("it holds an object made by {what}, not a state dict"),
        _ => bail!("it holds no state dict (a dict of tensors)"),
    };
    let d = d.borrow();
    let tensors: Vec<(String, Rc<TensorRef>)> = d
        .iter()
        .filter_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
            _ => None,
        })
        .collect();
    if !tensors.is_empty() {
        return Ok(tensors);
    }
    for (k, v) in d.iter() {
        if let (Value::Str(k), Value::Dict(_)) = (k, v) {
            if k == "state_dict" || k == "model" {
                return state_dict(v);
            }
        }
    }
    bail!("it holds no tensors by name (not a state dict)")
}

/// Makes the tensors from their storages' bytes.
fn materialize(
    tensors: Vec<(String, Rc<TensorRef>)>,
    blobs: &HashMap<String, &[u8]>,
) -> Result<Vec<(String, Tensor)>> {
    let mut bases: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let s = &t.storage;
        if !bases.contains_key(&s.key) {
            let bytes = blobs
                .get(&s.key)
                .ok_or_else(|| anyhow!("the data of tensor '{name}' is missing"))?;
            let elem = s.kind.elt_size_in_bytes();
            if bytes.len() % elem != 0 {
                bail!("the data of tensor '{name}' is truncated");
            }
            let n = (bytes.len() / elem) as i64;
            let base = Tensor::f_from_data_size(bytes, &[n], s.kind)?;
            bases.insert(s.key.clone(), base);
        }
        let base = &bases[&s.key];
        let available = base.size()[0];
        if t.size.len() != t.stride.len() || t.size.iter().chain(&t.stride).any(|&x| x < 0) {
            bail!("tensor '{name}' has a malformed shape");
        }
        let empty = t.size.contains(&0);
        let last = t.offset
            + t.size
                .iter()
                .zip(&t.stride)
                .map(|(&d, &st)| (d - 1).max(0) * st)
                .sum::<i64>();
        if t.offset < 0 || (!empty && last >= available) {
            bail!("tensor '{name}' reaches past its data");
        }
        let tensor = base
            .f_as_strided(t.size.as_slice(), t.stride.as_slice(), t.offset)?
            .contiguous();
        out.push((name, tensor));
    }
    Ok(out)
}
