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
pub fn read_zip(
    data: &[u8],
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Option<Vec<(String, Tensor)>>> {
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
    let tensors = state_dict(&root, wanted)?;
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
pub fn read_legacy(data: &[u8], wanted: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
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
    materialize(state_dict(&root, wanted)?, &blobs)
}

fn slice(data: &[u8], at: usize, len: usize) -> Result<&[u8]> {
    at.checked_add(len)
        .and_then(|end| data.get(at..end))
        .ok_or_else(|| anyhow!("file is truncated"))
}

/// The entries of a zip archive by name, as slices of `data`: torch.save stores them
/// uncompressed, so they are used in place rather than copied (weights are hundreds of MB).
fn zip_entries(data: &[u8]) -> Result<HashMap<String, &[u8]>> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(data))
        .map_err(|e| anyhow!("damaged zip file: {e}"))?;
    let mut entries = HashMap::with_capacity(archive.len());
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
            .map_err(|e| anyhow!("damaged zip file: {e}"))?;
        let name = entry.name().to_string();
        if entry.compression() != zip::CompressionMethod::Stored
            || entry.compressed_size() != entry.size()
            || entry.encrypted()
        {
            bail!("zip entry {name} is compressed (torch.save stores its entries)");
        }
        let at = usize::try_from(entry.data_start());
        let len = usize::try_from(entry.size());
        let (Ok(at), Ok(len)) = (at, len) else {
            bail!("zip entry {name} is out of range");
        };
        let bytes = slice(data, at, len)?;
        entries.insert(name, bytes);
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

/// A pickled integer from its little-endian two's complement bytes.
fn long(b: &[u8]) -> Value {
    if b.len() > 8 {
        return Value::BigInt(b.to_vec());
    }
    let sign = if b.last().is_some_and(|&x| x & 0x80 != 0) {
        0xff
    } else {
        0
    };
    let mut buf = [sign; 8];
    buf[..b.len()].copy_from_slice(b);
    Value::Int(i64::from_le_bytes(buf))
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

/// Declares the pickle opcodes: the enum, and the byte each one is written as.
macro_rules! opcodes {
    ($($(#[$doc:meta])* $name:ident = $byte:expr,)*) => {
        /// The pickle opcodes state dicts use, named as in Python's `pickletools` (in
        /// CamelCase). Any other opcode fails the load.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum Op {
            $($(#[$doc])* $name,)*
        }

        #[allow(non_upper_case_globals)]
        mod byte {
            $(pub const $name: u8 = $byte;)*
        }

        impl Op {
            fn from_byte(b: u8) -> Option<Op> {
                match b {
                    $(byte::$name => Some(Op::$name),)*
                    _ => None,
                }
            }
        }
    };
}

opcodes! {
    /// Protocol version (2+); framing in protocol 4.
    Proto = 0x80,
    Frame = 0x95,
    /// End of the pickle: its object is on top of the stack.
    Stop = b'.',
    Mark = b'(',
    EmptyTuple = b')',
    EmptyList = b']',
    EmptyDict = b'}',
    /// Tuples of the items since the mark, or of the top 1, 2, 3 items.
    Tuple = b't',
    Tuple1 = 0x85,
    Tuple2 = 0x86,
    Tuple3 = 0x87,
    List = b'l',
    Dict = b'd',
    Append = b'a',
    Appends = b'e',
    SetItem = b's',
    SetItems = b'u',
    /// Python's None (pickletools' NONE).
    NoneValue = b'N',
    NewTrue = 0x88,
    NewFalse = 0x89,
    /// Protocol 0 integer (and boolean) as a line of text.
    Int = b'I',
    /// Signed 4-byte, unsigned 1- and 2-byte integers.
    BinInt = b'J',
    BinInt1 = b'K',
    BinInt2 = b'M',
    /// Integers of any size, two's complement, their length in 1 or 4 bytes.
    Long1 = 0x8a,
    Long4 = 0x8b,
    BinFloat = b'G',
    BinUnicode = b'X',
    ShortBinUnicode = 0x8c,
    BinUnicode8 = 0x8d,
    BinString = b'T',
    ShortBinString = b'U',
    BinBytes = b'B',
    ShortBinBytes = b'C',
    BinBytes8 = 0x8e,
    /// Memo writes: key as text, 1- or 4-byte key, or the next free key.
    Put = b'p',
    BinPut = b'q',
    LongBinPut = b'r',
    Memoize = 0x94,
    /// Memo reads: key as text, 1- or 4-byte key.
    Get = b'g',
    BinGet = b'h',
    LongBinGet = b'j',
    /// A Python object by module and name: as two lines of text, or from the stack.
    Global = b'c',
    StackGlobal = 0x93,
    /// Calls: `f(*args)`, and `cls.__new__(cls, *args)`.
    Reduce = b'R',
    NewObj = 0x81,
    /// Sets an object's state (an OrderedDict's `_metadata`): not modelled.
    Build = b'b',
    /// A persistent id: the storages of tensors.
    BinPersId = b'Q',
}

impl Op {
    /// Bytes of the little-endian unsigned argument (a value or a length) that follows the
    /// opcode; 0 for those without one or with a text argument.
    fn width(self) -> usize {
        use Op::*;
        match self {
            Proto | BinInt1 | Long1 | ShortBinUnicode | ShortBinString | ShortBinBytes | BinPut
            | BinGet => 1,
            BinInt2 => 2,
            BinInt | Long4 | BinUnicode | BinString | BinBytes | LongBinPut | LongBinGet => 4,
            Frame | BinFloat | BinUnicode8 | BinBytes8 => 8,
            _ => 0,
        }
    }
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

    /// Adds key-value pairs to `dict`.
    fn set_items(dict: &Value, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            bail!("pickle dict items are unpaired");
        }
        let Value::Dict(d) = dict else {
            bail!("pickle sets items on a non-dict");
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    /// The top `n` items of the stack.
    fn pop_n(&mut self, n: usize) -> Result<Vec<Value>> {
        let at = self
            .stack
            .len()
            .checked_sub(n)
            .ok_or_else(|| anyhow!("pickle stack underflow"))?;
        Ok(self.stack.split_off(at))
    }

    /// Runs the pickle up to its STOP; returns the object it made.
    fn load(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let b = self.byte()?;
            let op = Op::from_byte(b)
                .ok_or_else(|| anyhow!("unsupported pickle opcode 0x{b:02x} at byte {at}"))?;
            if let Some(object) = self.step(op)? {
                return Ok(object);
            }
        }
    }

    /// Runs one opcode; returns the pickle's object at STOP.
    fn step(&mut self, op: Op) -> Result<Option<Value>> {
        use Op::*;
        match op {
            Stop => return self.pop().map(Some),
            Proto | Frame => {
                self.take(op.width())?;
            }
            Mark => self.marks.push(self.stack.len()),
            Append | Appends => {
                let items = match op {
                    Append => vec![self.pop()?],
                    _ => self.pop_mark()?,
                };
                match self.top()? {
                    Value::List(l) => l.borrow_mut().extend(items),
                    Value::Opaque(_) => {}
                    _ => bail!("pickle appends to a non-list"),
                }
            }
            SetItem | SetItems => {
                let items = match op {
                    SetItem => self.pop_n(2)?,
                    _ => self.pop_mark()?,
                };
                Self::set_items(self.top()?, items)?;
            }
            Put | BinPut | LongBinPut | Memoize => {
                let key = self.memo_key(op)?;
                self.memo_put(key)?;
            }
            Get | BinGet | LongBinGet => {
                let key = self.memo_key(op)?;
                self.memo_get(key)?;
            }
            Build => {
                self.pop()?;
            }
            _ => {
                let v = self.value(op)?;
                self.push(v);
            }
        }
        Ok(None)
    }

    /// The memo key of a memo opcode.
    fn memo_key(&mut self, op: Op) -> Result<u64> {
        match op {
            Op::Put | Op::Get => self.line()?.parse().map_err(|_| anyhow!("bad pickle memo")),
            Op::Memoize => Ok(self.memo.len() as u64),
            _ => self.uint(op.width()),
        }
    }

    /// Runs an opcode that makes one new value (pushed by `step`).
    fn value(&mut self, op: Op) -> Result<Value> {
        use Op::*;
        Ok(match op {
            NoneValue => Value::None,
            NewTrue | NewFalse => Value::Bool(op == NewTrue),
            Int => match self.line()?.as_str() {
                "01" => Value::Bool(true),
                "00" => Value::Bool(false),
                l => Value::Int(l.parse().map_err(|_| anyhow!("bad pickle int"))?),
            },
            BinInt => Value::Int(self.uint(4)? as u32 as i32 as i64),
            BinInt1 | BinInt2 => Value::Int(self.uint(op.width())? as i64),
            Long1 | Long4 => {
                let n = self.len(op.width())?;
                long(self.take(n)?)
            }
            BinFloat => {
                self.take(op.width())?;
                Value::Float
            }
            BinUnicode | ShortBinUnicode | BinUnicode8 | BinString | ShortBinString => {
                let n = self.len(op.width())?;
                self.string(n)?
            }
            BinBytes | ShortBinBytes | BinBytes8 => {
                let n = self.len(op.width())?;
                self.take(n)?;
                Value::Bytes
            }
            EmptyTuple => tuple(vec![]),
            EmptyList => Value::List(Rc::default()),
            EmptyDict => Value::Dict(Rc::default()),
            Tuple => tuple(self.pop_mark()?),
            Tuple1 | Tuple2 | Tuple3 => {
                let n = match op {
                    Tuple1 => 1,
                    Tuple2 => 2,
                    _ => 3,
                };
                tuple(self.pop_n(n)?)
            }
            List => Value::List(Rc::new(RefCell::new(self.pop_mark()?))),
            Dict => {
                let items = self.pop_mark()?;
                let d = Value::Dict(Rc::default());
                Self::set_items(&d, items)?;
                d
            }
            Global => {
                let module = self.line()?;
                let name = self.line()?;
                Value::Global(Rc::new((module, name)))
            }
            StackGlobal => {
                let (Value::Str(name), Value::Str(module)) = (self.pop()?, self.pop()?) else {
                    bail!("pickle global is not named by strings");
                };
                Value::Global(Rc::new((module, name)))
            }
            Reduce | NewObj => {
                let args = self.pop()?;
                let f = self.pop()?;
                self.call(&f, &args)?
            }
            BinPersId => {
                let pid = self.pop()?;
                self.persistent(&pid)?
            }
            Stop | Proto | Frame | Mark | Append | Appends | SetItem | SetItems | Put | BinPut
            | LongBinPut | Memoize | Get | BinGet | LongBinGet | Build => {
                unreachable!("{op:?} makes no value")
            }
        })
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
/// its "state_dict" or "model" key; only the `wanted` names (the others' data is never
/// converted).
fn state_dict(root: &Value, wanted: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Rc<TensorRef>)>> {
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
        return Ok(tensors.into_iter().filter(|(k, _)| wanted(k)).collect());
    }
    for (k, v) in d.iter() {
        if let (Value::Str(k), Value::Dict(_)) = (k, v) {
            if k == "state_dict" || k == "model" {
                return state_dict(v, wanted);
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
