//! SPOP 2.0 codec: the frames HAProxy's SPOE filter exchanges with an agent.
//!
//! The layout follows what HAProxy 2.6.12 puts on the wire (captures in `fixtures/spop/`), which
//! differs from the prose of its SPOE.txt in two places: the typed-data byte carries the type in
//! the *low* nibble and flags in the high one, and integers use HAProxy's "peers" varint rather
//! than LEB128.
//!
//! ```text
//! frame   = length:u32be  type:u8  flags:u32be  stream-id:varint  frame-id:varint  payload
//! payload = KV-LIST (HELLO, DISCONNECT) | LIST-OF-MESSAGES (NOTIFY) | LIST-OF-ACTIONS (ACK)
//! ```
//!
//! The codec deliberately supports only what also works with HAProxy 3.x: every frame must carry
//! FIN (no fragmentation), the agent never announces `async`, and stream ids are opaque values
//! echoed back on the connection they came from.
//!
//! Decoding is total: any byte string yields a frame, "need more bytes", or a [`FrameError`]
//! naming the problem; nothing here indexes or allocates based on unchecked input.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The only protocol version HAProxy 2.6 and 3.x speak.
pub const SPOP_VERSION: &str = "2.0";

/// HAProxy refuses an AGENT-HELLO announcing less than this (`MIN_FRAME_SIZE` in flt_spoe.c).
pub const MIN_FRAME_SIZE: u32 = 256;

/// The largest frame this agent accepts. HAProxy offers `tune.bufsize - 4` (16380 by default)
/// and the agent answers the smaller of the two, so this only matters when an operator raises
/// `tune.bufsize` to fit large certificate chains; 64 KiB keeps per-connection memory bounded.
pub const AGENT_MAX_FRAME_SIZE: u32 = 65_532;

/// Frame flag: last (here: only) fragment of a frame.
pub const FLAG_FIN: u32 = 0x0000_0001;

/// The 4-byte big-endian length that precedes every frame.
pub const LENGTH_PREFIX: usize = 4;

/// Frame type byte values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// Continuation of a fragmented frame; we never negotiate fragmentation.
    Unset,
    HaproxyHello,
    HaproxyDisconnect,
    Notify,
    AgentHello,
    AgentDisconnect,
    Ack,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<FrameType> {
        Some(match b {
            0 => FrameType::Unset,
            1 => FrameType::HaproxyHello,
            2 => FrameType::HaproxyDisconnect,
            3 => FrameType::Notify,
            101 => FrameType::AgentHello,
            102 => FrameType::AgentDisconnect,
            103 => FrameType::Ack,
            _ => return None,
        })
    }

    pub fn as_u8(self) -> u8 {
        match self {
            FrameType::Unset => 0,
            FrameType::HaproxyHello => 1,
            FrameType::HaproxyDisconnect => 2,
            FrameType::Notify => 3,
            FrameType::AgentHello => 101,
            FrameType::AgentDisconnect => 102,
            FrameType::Ack => 103,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameType::Unset => "UNSET",
            FrameType::HaproxyHello => "HAPROXY-HELLO",
            FrameType::HaproxyDisconnect => "HAPROXY-DISCONNECT",
            FrameType::Notify => "NOTIFY",
            FrameType::AgentHello => "AGENT-HELLO",
            FrameType::AgentDisconnect => "AGENT-DISCONNECT",
            FrameType::Ack => "ACK",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Status codes carried by DISCONNECT frames (SPOE.txt §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCode {
    Normal,
    Io,
    Timeout,
    TooBig,
    Invalid,
    NoVersion,
    NoFrameSize,
    NoCapabilities,
    BadVersion,
    BadFrameSize,
    FragmentationNotSupported,
    InterlacedFrames,
    FrameIdNotFound,
    Resource,
    Unknown,
}

impl StatusCode {
    pub fn code(self) -> u32 {
        match self {
            StatusCode::Normal => 0,
            StatusCode::Io => 1,
            StatusCode::Timeout => 2,
            StatusCode::TooBig => 3,
            StatusCode::Invalid => 4,
            StatusCode::NoVersion => 5,
            StatusCode::NoFrameSize => 6,
            StatusCode::NoCapabilities => 7,
            StatusCode::BadVersion => 8,
            StatusCode::BadFrameSize => 9,
            StatusCode::FragmentationNotSupported => 10,
            StatusCode::InterlacedFrames => 11,
            StatusCode::FrameIdNotFound => 12,
            StatusCode::Resource => 13,
            StatusCode::Unknown => 99,
        }
    }
}

/// Everything that can be wrong with bytes claiming to be a frame, or with a frame we were
/// asked to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length exceeds the negotiated (or, before HELLO, our) maximum.
    FrameTooBig {
        len: usize,
        max: usize,
    },
    /// A complete frame ended in the middle of the named field.
    Truncated {
        what: &'static str,
    },
    /// A varint would not fit in 64 bits.
    VarintOverflow {
        what: &'static str,
    },
    UnknownFrameType(u8),
    UnknownDataType(u8),
    /// An INT32/UINT32 whose varint does not fit the declared width.
    IntegerOutOfRange {
        what: &'static str,
    },
    /// A frame without FIN, or an UNSET continuation frame: fragmentation is never negotiated.
    Fragmented {
        frame_type: FrameType,
    },
    /// HELLO and DISCONNECT frames must use stream-id 0 and frame-id 0.
    NonZeroIds {
        frame_type: FrameType,
    },
    /// A key or name that must be text is not UTF-8.
    InvalidUtf8 {
        what: &'static str,
    },
    UnknownActionType(u8),
    BadActionArgs {
        action_type: u8,
        nb_args: u8,
    },
    UnknownVarScope(u8),
    /// A KV-list entry the frame type requires is absent.
    MissingKey(&'static str),
    /// A KV-list entry has a type the protocol does not allow for it.
    WrongType {
        key: &'static str,
    },
    /// HAProxy offered no protocol version we speak.
    UnsupportedVersion(String),
    /// max-frame-size below the protocol minimum.
    BadMaxFrameSize(u64),
    /// An ACK needs at least one action: HAProxy 3.1.0 leaves a stream waiting on an empty one.
    EmptyAck,
    /// LIST-OF-MESSAGES counts arguments in one byte.
    TooManyArgs {
        count: usize,
    },
}

impl FrameError {
    /// The status code to put in the AGENT-DISCONNECT that answers this error.
    pub fn status_code(&self) -> StatusCode {
        match self {
            FrameError::FrameTooBig { .. } => StatusCode::TooBig,
            FrameError::Fragmented { .. } => StatusCode::FragmentationNotSupported,
            FrameError::MissingKey("supported-versions") | FrameError::MissingKey("version") => {
                StatusCode::NoVersion
            }
            FrameError::MissingKey("max-frame-size") => StatusCode::NoFrameSize,
            FrameError::MissingKey("capabilities") => StatusCode::NoCapabilities,
            FrameError::UnsupportedVersion(_) => StatusCode::BadVersion,
            FrameError::BadMaxFrameSize(_) => StatusCode::BadFrameSize,
            FrameError::EmptyAck | FrameError::TooManyArgs { .. } => StatusCode::Unknown,
            _ => StatusCode::Invalid,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::FrameTooBig { len, max } => {
                write!(f, "frame of {len} bytes exceeds the maximum of {max}")
            }
            FrameError::Truncated { what } => write!(f, "frame truncated in {what}"),
            FrameError::VarintOverflow { what } => write!(f, "varint overflows 64 bits in {what}"),
            FrameError::UnknownFrameType(t) => write!(f, "unknown frame type {t}"),
            FrameError::UnknownDataType(t) => write!(f, "unknown data type {t}"),
            FrameError::IntegerOutOfRange { what } => write!(f, "integer out of range in {what}"),
            FrameError::Fragmented { frame_type } => {
                write!(
                    f,
                    "fragmented {frame_type} frame (fragmentation not supported)"
                )
            }
            FrameError::NonZeroIds { frame_type } => {
                write!(f, "{frame_type} frame with non-zero stream-id or frame-id")
            }
            FrameError::InvalidUtf8 { what } => write!(f, "{what} is not valid UTF-8"),
            FrameError::UnknownActionType(t) => write!(f, "unknown action type {t}"),
            FrameError::BadActionArgs {
                action_type,
                nb_args,
            } => write!(f, "action type {action_type} with {nb_args} arguments"),
            FrameError::UnknownVarScope(s) => write!(f, "unknown variable scope {s}"),
            FrameError::MissingKey(k) => write!(f, "missing \"{k}\""),
            FrameError::WrongType { key } => write!(f, "\"{key}\" has the wrong data type"),
            FrameError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "no supported SPOP version in \"{v}\" (need {SPOP_VERSION})"
                )
            }
            FrameError::BadMaxFrameSize(n) => {
                write!(
                    f,
                    "max-frame-size {n} is below the minimum of {MIN_FRAME_SIZE}"
                )
            }
            FrameError::EmptyAck => f.write_str("an ACK must carry at least one action"),
            FrameError::TooManyArgs { count } => {
                write!(f, "{count} message arguments do not fit in one byte")
            }
        }
    }
}

impl std::error::Error for FrameError {}

// ---------------------------------------------------------------------------------------------
// Varint

/// Appends `v` in HAProxy's "peers" varint encoding (`encode_varint` in intops.h): values below
/// 240 take one byte; above, the first byte carries 4 bits and each further byte 7.
pub fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    if v < 240 {
        out.push(v as u8);
        return;
    }
    out.push((v as u8) | 0xF0);
    v = (v - 240) >> 4;
    while v >= 128 {
        out.push((v as u8) | 0x80);
        v = (v - 128) >> 7;
    }
    out.push(v as u8);
}

/// Decodes one varint from the front of `buf`, returning the value and the bytes used.
/// `what` names the field for error messages.
pub fn decode_varint(buf: &[u8], what: &'static str) -> Result<(u64, usize), FrameError> {
    let first = *buf.first().ok_or(FrameError::Truncated { what })?;
    if first < 240 {
        return Ok((u64::from(first), 1));
    }
    // Accumulate in u128 so an overlong encoding is detected instead of wrapping silently
    // the way HAProxy's own decoder would; every continuation byte adds at least 2^shift, so
    // the value leaves u64 range before the shift can leave u128 range.
    let mut value = u128::from(first);
    let mut shift = 4u32;
    let mut i = 1;
    loop {
        let c = *buf.get(i).ok_or(FrameError::Truncated { what })?;
        i += 1;
        value += u128::from(c) << shift;
        if value > u128::from(u64::MAX) {
            return Err(FrameError::VarintOverflow { what });
        }
        shift += 7;
        if c < 128 {
            return Ok((value as u64, i));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Typed data

/// A value as SPOP types it. STRING stays bytes because HAProxy does not promise UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypedData {
    Null,
    Bool(bool),
    Int32(i32),
    Uint32(u32),
    Int64(i64),
    Uint64(u64),
    Ipv4(Ipv4Addr),
    Ipv6(Ipv6Addr),
    String(Vec<u8>),
    Binary(Vec<u8>),
}

const T_NULL: u8 = 0;
const T_BOOL: u8 = 1;
const T_INT32: u8 = 2;
const T_UINT32: u8 = 3;
const T_INT64: u8 = 4;
const T_UINT64: u8 = 5;
const T_IPV4: u8 = 6;
const T_IPV6: u8 = 7;
const T_STRING: u8 = 8;
const T_BINARY: u8 = 9;
/// HAProxy treats a BOOL as true only when the flag nibble is exactly this.
const FL_TRUE: u8 = 0x10;

impl TypedData {
    /// Any of the four integer types, widened; HAProxy itself treats them alike.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            TypedData::Int32(v) => u64::try_from(v).ok(),
            TypedData::Uint32(v) => Some(u64::from(v)),
            TypedData::Int64(v) => u64::try_from(v).ok(),
            TypedData::Uint64(v) => Some(v),
            _ => None,
        }
    }

    /// The text of a STRING, if it is one and is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            TypedData::String(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            TypedData::Null => "NULL",
            TypedData::Bool(_) => "BOOL",
            TypedData::Int32(_) => "INT32",
            TypedData::Uint32(_) => "UINT32",
            TypedData::Int64(_) => "INT64",
            TypedData::Uint64(_) => "UINT64",
            TypedData::Ipv4(_) => "IPV4",
            TypedData::Ipv6(_) => "IPV6",
            TypedData::String(_) => "STRING",
            TypedData::Binary(_) => "BINARY",
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            TypedData::Null => out.push(T_NULL),
            TypedData::Bool(b) => out.push(if *b { T_BOOL | FL_TRUE } else { T_BOOL }),
            TypedData::Int32(v) => {
                out.push(T_INT32);
                // Sign-extended, so HAProxy (which reads every integer as a 64-bit signed
                // sample) sees the same negative number.
                encode_varint(i64::from(*v) as u64, out);
            }
            TypedData::Uint32(v) => {
                out.push(T_UINT32);
                encode_varint(u64::from(*v), out);
            }
            TypedData::Int64(v) => {
                out.push(T_INT64);
                encode_varint(*v as u64, out);
            }
            TypedData::Uint64(v) => {
                out.push(T_UINT64);
                encode_varint(*v, out);
            }
            TypedData::Ipv4(a) => {
                out.push(T_IPV4);
                out.extend_from_slice(&a.octets());
            }
            TypedData::Ipv6(a) => {
                out.push(T_IPV6);
                out.extend_from_slice(&a.octets());
            }
            TypedData::String(b) => {
                out.push(T_STRING);
                put_bytes(b, out);
            }
            TypedData::Binary(b) => {
                out.push(T_BINARY);
                put_bytes(b, out);
            }
        }
    }
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    encode_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// A bounds-checked cursor over one frame's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(FrameError::Truncated { what })?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(FrameError::Truncated { what })?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(FrameError::Truncated { what })?;
        self.pos = end;
        Ok(s)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, FrameError> {
        let (v, used) = decode_varint(self.rest(), what)?;
        self.pos += used;
        Ok(v)
    }

    /// A varint length followed by that many bytes.
    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], FrameError> {
        let len = self.varint(what)?;
        let len = usize::try_from(len).map_err(|_| FrameError::Truncated { what })?;
        self.take(len, what)
    }

    fn text(&mut self, what: &'static str) -> Result<String, FrameError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| FrameError::InvalidUtf8 { what })
    }

    fn typed(&mut self, what: &'static str) -> Result<TypedData, FrameError> {
        let tb = self.u8(what)?;
        Ok(match tb & 0x0F {
            T_NULL => TypedData::Null,
            T_BOOL => TypedData::Bool(tb & 0xF0 == FL_TRUE),
            T_INT32 => {
                let v = self.varint(what)? as i64;
                TypedData::Int32(
                    i32::try_from(v).map_err(|_| FrameError::IntegerOutOfRange { what })?,
                )
            }
            T_UINT32 => {
                let v = self.varint(what)?;
                TypedData::Uint32(
                    u32::try_from(v).map_err(|_| FrameError::IntegerOutOfRange { what })?,
                )
            }
            T_INT64 => TypedData::Int64(self.varint(what)? as i64),
            T_UINT64 => TypedData::Uint64(self.varint(what)?),
            T_IPV4 => {
                let b = self.take(4, what)?;
                let mut o = [0u8; 4];
                o.copy_from_slice(b);
                TypedData::Ipv4(Ipv4Addr::from(o))
            }
            T_IPV6 => {
                let b = self.take(16, what)?;
                let mut o = [0u8; 16];
                o.copy_from_slice(b);
                TypedData::Ipv6(Ipv6Addr::from(o))
            }
            T_STRING => TypedData::String(self.bytes(what)?.to_vec()),
            T_BINARY => TypedData::Binary(self.bytes(what)?.to_vec()),
            other => return Err(FrameError::UnknownDataType(other)),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Payloads

/// The KEY/VALUE list of HELLO and DISCONNECT frames, in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvList(pub Vec<(String, TypedData)>);

impl KvList {
    /// The first value under `key`. Keys are compared exactly: HAProxy's own prefix match is
    /// a quirk we must not rely on, so we also send exact keys.
    pub fn get(&self, key: &str) -> Option<&TypedData> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        let mut items = Vec::new();
        while !r.is_empty() {
            let key = r.text("KV-list key")?;
            let value = r.typed("KV-list value")?;
            items.push((key, value));
        }
        Ok(KvList(items))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for (k, v) in &self.0 {
            put_bytes(k.as_bytes(), out);
            v.encode(out);
        }
    }
}

/// One `spoe-message` of a NOTIFY. Argument names may be empty and may repeat (`args src dst`
/// sends two unnamed arguments), so they stay an ordered list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub name: String,
    pub args: Vec<(String, TypedData)>,
}

impl Message {
    /// The first argument called `name`.
    pub fn arg(&self, name: &str) -> Option<&TypedData> {
        self.args.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// A NOTIFY: messages for one event of one HAProxy stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub stream_id: u64,
    pub frame_id: u64,
    pub messages: Vec<Message>,
}

impl Notify {
    /// The first argument called `name` in any message (message `name` first if given).
    pub fn find_arg(&self, message: Option<&str>, name: &str) -> Option<&TypedData> {
        if let Some(m) = message {
            if let Some(v) = self
                .messages
                .iter()
                .filter(|msg| msg.name == m)
                .find_map(|msg| msg.arg(name))
            {
                return Some(v);
            }
        }
        self.messages.iter().find_map(|msg| msg.arg(name))
    }
}

/// One header field of `req.hdrs_bin`: name and value, as bytes.
pub type HeaderField<'a> = (&'a [u8], &'a [u8]);

/// Decodes HAProxy's `req.hdrs_bin`: `<str:name><str:value>` per header field, in request
/// order, ended by an empty name and an empty value, where `<str>` is a varint length and the
/// bytes. Names are as the client sent them (HTTP/1) or lower case (HTTP/2).
pub fn decode_hdrs_bin(buf: &[u8]) -> Result<Vec<HeaderField<'_>>, FrameError> {
    fn text<'a>(buf: &'a [u8], at: &mut usize) -> Result<&'a [u8], FrameError> {
        let (len, n) = decode_varint(&buf[*at..], "header length")?;
        *at += n;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| at.checked_add(l))
            .filter(|&e| e <= buf.len())
            .ok_or(FrameError::Truncated {
                what: "header field",
            })?;
        let s = &buf[*at..end];
        *at = end;
        Ok(s)
    }
    let mut fields = Vec::new();
    let mut at = 0;
    loop {
        let name = text(buf, &mut at)?;
        let value = text(buf, &mut at)?;
        if name.is_empty() && value.is_empty() {
            return Ok(fields);
        }
        fields.push((name, value));
    }
}

/// Variable scopes of SET-VAR/UNSET-VAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VarScope {
    Process,
    Session,
    Transaction,
    Request,
    Response,
}

impl VarScope {
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => VarScope::Process,
            1 => VarScope::Session,
            2 => VarScope::Transaction,
            3 => VarScope::Request,
            4 => VarScope::Response,
            _ => return None,
        })
    }

    pub fn as_u8(self) -> u8 {
        match self {
            VarScope::Process => 0,
            VarScope::Session => 1,
            VarScope::Transaction => 2,
            VarScope::Request => 3,
            VarScope::Response => 4,
        }
    }
}

const ACT_SET_VAR: u8 = 1;
const ACT_UNSET_VAR: u8 = 2;

/// An action in an ACK. HAProxy prefixes the name with `<scope>.<var-prefix>.` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SetVar {
        scope: VarScope,
        name: String,
        value: TypedData,
    },
    UnsetVar {
        scope: VarScope,
        name: String,
    },
}

impl Action {
    fn decode(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        let action_type = r.u8("action type")?;
        let nb_args = r.u8("action argument count")?;
        let expected = match action_type {
            ACT_SET_VAR => 3,
            ACT_UNSET_VAR => 2,
            other => return Err(FrameError::UnknownActionType(other)),
        };
        if nb_args != expected {
            return Err(FrameError::BadActionArgs {
                action_type,
                nb_args,
            });
        }
        let sb = r.u8("variable scope")?;
        let scope = VarScope::from_u8(sb).ok_or(FrameError::UnknownVarScope(sb))?;
        let name = r.text("variable name")?;
        if action_type == ACT_SET_VAR {
            let value = r.typed("variable value")?;
            Ok(Action::SetVar { scope, name, value })
        } else {
            Ok(Action::UnsetVar { scope, name })
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Action::SetVar { scope, name, value } => {
                out.extend_from_slice(&[ACT_SET_VAR, 3, scope.as_u8()]);
                put_bytes(name.as_bytes(), out);
                value.encode(out);
            }
            Action::UnsetVar { scope, name } => {
                out.extend_from_slice(&[ACT_UNSET_VAR, 2, scope.as_u8()]);
                put_bytes(name.as_bytes(), out);
            }
        }
    }
}

/// An ACK: the answer to the NOTIFY with the same stream-id and frame-id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub stream_id: u64,
    pub frame_id: u64,
    pub actions: Vec<Action>,
}

// ---------------------------------------------------------------------------------------------
// Frames

/// A complete, unfragmented frame. HELLO and DISCONNECT frames always have stream-id and
/// frame-id 0, so only NOTIFY and ACK carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    HaproxyHello(KvList),
    HaproxyDisconnect(KvList),
    Notify(Notify),
    AgentHello(KvList),
    AgentDisconnect(KvList),
    Ack(Ack),
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::HaproxyHello(_) => FrameType::HaproxyHello,
            Frame::HaproxyDisconnect(_) => FrameType::HaproxyDisconnect,
            Frame::Notify(_) => FrameType::Notify,
            Frame::AgentHello(_) => FrameType::AgentHello,
            Frame::AgentDisconnect(_) => FrameType::AgentDisconnect,
            Frame::Ack(_) => FrameType::Ack,
        }
    }

    /// The AGENT-HELLO we send: version 2.0, the negotiated frame size, and only
    /// `pipelining` (never `async`, removed in 3.1, nor `fragmentation`, which HAProxy cannot
    /// receive).
    pub fn agent_hello(max_frame_size: u32) -> Frame {
        Frame::AgentHello(KvList(vec![
            (
                "version".into(),
                TypedData::String(SPOP_VERSION.as_bytes().to_vec()),
            ),
            ("max-frame-size".into(), TypedData::Uint32(max_frame_size)),
            (
                "capabilities".into(),
                TypedData::String(b"pipelining".to_vec()),
            ),
        ]))
    }

    /// An AGENT-DISCONNECT. The message is cut so the frame stays far below the 256-byte
    /// minimum frame size any peer accepts.
    pub fn agent_disconnect(status: StatusCode, message: &str) -> Frame {
        let mut cut = message.len().min(160);
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        Frame::AgentDisconnect(KvList(vec![
            ("status-code".into(), TypedData::Uint32(status.code())),
            (
                "message".into(),
                TypedData::String(message.as_bytes()[..cut].to_vec()),
            ),
        ]))
    }

    /// An ACK answering NOTIFY (`stream_id`, `frame_id`) with one SET-VAR.
    pub fn ack_set_var(
        stream_id: u64,
        frame_id: u64,
        scope: VarScope,
        name: &str,
        value: TypedData,
    ) -> Frame {
        Frame::Ack(Ack {
            stream_id,
            frame_id,
            actions: vec![Action::SetVar {
                scope,
                name: name.to_owned(),
                value,
            }],
        })
    }

    /// Appends the frame, length prefix included, to `out`. FIN is always set. On error `out`
    /// is left as it was.
    pub fn encode(&self, max_frame_size: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        let result = self.encode_unchecked(out).and_then(|()| {
            let len = out.len() - start - LENGTH_PREFIX;
            if len > max_frame_size {
                return Err(FrameError::FrameTooBig {
                    len,
                    max: max_frame_size,
                });
            }
            let len32 = u32::try_from(len).map_err(|_| FrameError::FrameTooBig {
                len,
                max: u32::MAX as usize,
            })?;
            out[start..start + LENGTH_PREFIX].copy_from_slice(&len32.to_be_bytes());
            Ok(())
        });
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_unchecked(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let (sid, fid) = match self {
            Frame::Notify(n) => (n.stream_id, n.frame_id),
            Frame::Ack(a) => (a.stream_id, a.frame_id),
            _ => (0, 0),
        };
        out.extend_from_slice(&[0; LENGTH_PREFIX]);
        out.push(self.frame_type().as_u8());
        out.extend_from_slice(&FLAG_FIN.to_be_bytes());
        encode_varint(sid, out);
        encode_varint(fid, out);
        match self {
            Frame::HaproxyHello(kv)
            | Frame::HaproxyDisconnect(kv)
            | Frame::AgentHello(kv)
            | Frame::AgentDisconnect(kv) => kv.encode(out),
            Frame::Notify(n) => {
                for m in &n.messages {
                    let nb = u8::try_from(m.args.len()).map_err(|_| FrameError::TooManyArgs {
                        count: m.args.len(),
                    })?;
                    put_bytes(m.name.as_bytes(), out);
                    out.push(nb);
                    for (k, v) in &m.args {
                        put_bytes(k.as_bytes(), out);
                        v.encode(out);
                    }
                }
            }
            Frame::Ack(a) => {
                if a.actions.is_empty() {
                    return Err(FrameError::EmptyAck);
                }
                for act in &a.actions {
                    act.encode(out);
                }
            }
        }
        Ok(())
    }
}

/// Decodes the first frame in `buf`, for a read loop that appends to `buf` and calls again.
///
/// Returns `Ok(None)` until a whole frame is buffered, and `Ok(Some((frame, consumed)))` once it
/// is, where `consumed` includes the length prefix. `max_frame_size` is checked against the
/// length prefix before waiting for the body, so a peer cannot make us buffer more than that.
pub fn decode(buf: &[u8], max_frame_size: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX) else {
        return Ok(None);
    };
    let mut lb = [0u8; LENGTH_PREFIX];
    lb.copy_from_slice(prefix);
    let len = u32::from_be_bytes(lb) as usize;
    if len > max_frame_size {
        return Err(FrameError::FrameTooBig {
            len,
            max: max_frame_size,
        });
    }
    let end = LENGTH_PREFIX
        .checked_add(len)
        .ok_or(FrameError::FrameTooBig {
            len,
            max: max_frame_size,
        })?;
    let Some(body) = buf.get(LENGTH_PREFIX..end) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, end)))
}

/// Decodes one frame without its length prefix; `body` must be exactly the frame.
pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
    let mut r = Reader::new(body);
    let tb = r.u8("frame type")?;
    let frame_type = FrameType::from_u8(tb).ok_or(FrameError::UnknownFrameType(tb))?;
    let fb = r.take(4, "frame flags")?;
    let flags = u32::from_be_bytes([fb[0], fb[1], fb[2], fb[3]]);
    let stream_id = r.varint("stream-id")?;
    let frame_id = r.varint("frame-id")?;
    // Without FIN a frame is a fragment; we never announce fragmentation, so a fragment (or
    // its UNSET continuation) means HAProxy and we disagree about the protocol.
    if frame_type == FrameType::Unset || flags & FLAG_FIN == 0 {
        return Err(FrameError::Fragmented { frame_type });
    }
    let kv_frame = |r: &mut Reader<'_>| {
        if stream_id != 0 || frame_id != 0 {
            return Err(FrameError::NonZeroIds { frame_type });
        }
        KvList::decode(r)
    };
    Ok(match frame_type {
        FrameType::HaproxyHello => Frame::HaproxyHello(kv_frame(&mut r)?),
        FrameType::HaproxyDisconnect => Frame::HaproxyDisconnect(kv_frame(&mut r)?),
        FrameType::AgentHello => Frame::AgentHello(kv_frame(&mut r)?),
        FrameType::AgentDisconnect => Frame::AgentDisconnect(kv_frame(&mut r)?),
        FrameType::Notify => {
            let mut messages = Vec::new();
            while !r.is_empty() {
                let name = r.text("message name")?;
                let nb_args = r.u8("message argument count")?;
                let mut args = Vec::with_capacity(usize::from(nb_args));
                for _ in 0..nb_args {
                    let k = r.text("argument name")?;
                    let v = r.typed("argument value")?;
                    args.push((k, v));
                }
                messages.push(Message { name, args });
            }
            Frame::Notify(Notify {
                stream_id,
                frame_id,
                messages,
            })
        }
        FrameType::Ack => {
            let mut actions = Vec::new();
            while !r.is_empty() {
                actions.push(Action::decode(&mut r)?);
            }
            Frame::Ack(Ack {
                stream_id,
                frame_id,
                actions,
            })
        }
        FrameType::Unset => return Err(FrameError::Fragmented { frame_type }),
    })
}

// ---------------------------------------------------------------------------------------------
// HELLO and DISCONNECT contents

/// What HAProxy announced in its HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyHello {
    pub supported_versions: Vec<String>,
    pub max_frame_size: u32,
    pub capabilities: Vec<String>,
    /// Absent on health checks; one per thread in 2.6, one per process from 3.0.
    pub engine_id: Option<String>,
    /// `option spop-check`: answer the HELLO, then close; this is not a session.
    pub healthcheck: bool,
}

impl HaproxyHello {
    /// Validates a HAPROXY-HELLO's KV-list. Errors map to the status codes HAProxy expects.
    pub fn from_kv(kv: &KvList) -> Result<Self, FrameError> {
        let versions = match kv.get("supported-versions") {
            None => return Err(FrameError::MissingKey("supported-versions")),
            Some(v) => v.as_str().ok_or(FrameError::WrongType {
                key: "supported-versions",
            })?,
        };
        let supported_versions: Vec<String> = versions
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if !supported_versions.iter().any(|v| is_spop_v2_0(v)) {
            return Err(FrameError::UnsupportedVersion(versions.to_owned()));
        }
        let max = match kv.get("max-frame-size") {
            None => return Err(FrameError::MissingKey("max-frame-size")),
            Some(v) => v.as_u64().ok_or(FrameError::WrongType {
                key: "max-frame-size",
            })?,
        };
        if max < u64::from(MIN_FRAME_SIZE) {
            return Err(FrameError::BadMaxFrameSize(max));
        }
        // Health checks send an empty string here; an absent key is what SPOE.txt calls an
        // error.
        let caps = match kv.get("capabilities") {
            None => return Err(FrameError::MissingKey("capabilities")),
            Some(v) => v.as_str().ok_or(FrameError::WrongType {
                key: "capabilities",
            })?,
        };
        let capabilities = caps
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let engine_id = match kv.get("engine-id") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or(FrameError::WrongType { key: "engine-id" })?
                    .to_owned(),
            ),
        };
        let healthcheck = match kv.get("healthcheck") {
            None => false,
            Some(TypedData::Bool(b)) => *b,
            Some(_) => return Err(FrameError::WrongType { key: "healthcheck" }),
        };
        Ok(HaproxyHello {
            supported_versions,
            max_frame_size: u32::try_from(max).unwrap_or(u32::MAX),
            capabilities,
            engine_id,
            healthcheck,
        })
    }

    /// The frame size both sides can live with: HAProxy accepts any value from the minimum up
    /// to what it offered.
    pub fn negotiate_frame_size(&self, ours: u32) -> u32 {
        self.max_frame_size.min(ours).max(MIN_FRAME_SIZE)
    }

    pub fn has_capability(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }
}

/// HAProxy compares versions numerically as MAJOR.MINOR, so "2.0" and "2.00" are the same.
fn is_spop_v2_0(v: &str) -> bool {
    let mut parts = v.splitn(2, '.');
    let major = parts.next().and_then(|s| s.parse::<u32>().ok());
    let minor = parts.next().and_then(|s| s.parse::<u32>().ok());
    major == Some(2) && minor == Some(0)
}

/// What an AGENT-HELLO announced (used by tests and by anything speaking to an agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHello {
    pub version: String,
    pub max_frame_size: u64,
    pub capabilities: Vec<String>,
}

impl AgentHello {
    pub fn from_kv(kv: &KvList) -> Result<Self, FrameError> {
        let version = kv
            .get("version")
            .ok_or(FrameError::MissingKey("version"))?
            .as_str()
            .ok_or(FrameError::WrongType { key: "version" })?
            .to_owned();
        let max_frame_size = kv
            .get("max-frame-size")
            .ok_or(FrameError::MissingKey("max-frame-size"))?
            .as_u64()
            .ok_or(FrameError::WrongType {
                key: "max-frame-size",
            })?;
        let capabilities = match kv.get("capabilities") {
            None => Vec::new(),
            Some(v) => v
                .as_str()
                .ok_or(FrameError::WrongType {
                    key: "capabilities",
                })?
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        Ok(AgentHello {
            version,
            max_frame_size,
            capabilities,
        })
    }
}

/// The contents of a DISCONNECT frame from either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub status_code: u64,
    /// Lossy: only ever logged.
    pub message: String,
}

impl Disconnect {
    pub fn from_kv(kv: &KvList) -> Result<Self, FrameError> {
        let status_code = kv
            .get("status-code")
            .ok_or(FrameError::MissingKey("status-code"))?
            .as_u64()
            .ok_or(FrameError::WrongType { key: "status-code" })?;
        let message = match kv.get("message") {
            None => String::new(),
            Some(TypedData::String(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(_) => return Err(FrameError::WrongType { key: "message" }),
        };
        Ok(Disconnect {
            status_code,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &[u8] = include_bytes!("../../fixtures/spop/haproxy-hello.bin");
    const HELLO_HC: &[u8] = include_bytes!("../../fixtures/spop/haproxy-hello-healthcheck.bin");
    const NOTIFY_CERT: &[u8] = include_bytes!("../../fixtures/spop/notify-cert.bin");
    const NOTIFY_NOCERT: &[u8] = include_bytes!("../../fixtures/spop/notify-nocert.bin");
    const DISCONNECT: &[u8] = include_bytes!("../../fixtures/spop/haproxy-disconnect.bin");
    const CLIENT_DER: &[u8] = include_bytes!("../../fixtures/spop/certs/client.der");

    const MAX: usize = 16380;

    fn decode_all(buf: &[u8]) -> Frame {
        let (frame, used) = decode(buf, MAX).unwrap().unwrap();
        assert_eq!(used, buf.len(), "fixture holds exactly one frame");
        frame
    }

    fn enc(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(usize::MAX, &mut out).unwrap();
        out
    }

    #[test]
    fn varint_vectors_from_reference() {
        let vectors: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (239, &[0xef]),
            (240, &[0xf0, 0x00]),
            (241, &[0xf1, 0x00]),
            (433, &[0xf1, 0x0c]),
            (2287, &[0xff, 0x7f]),
            (2288, &[0xf0, 0x80, 0x00]),
            (16380, &[0xfc, 0xf0, 0x06]),
            (264432, &[0xf0, 0x80, 0x80, 0x00]),
            (u64::from(u32::MAX), &[0xff, 0xf0, 0xfe, 0xfe, 0x7e]),
            (
                u64::MAX,
                &[0xff, 0xf0, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe, 0x0e],
            ),
        ];
        for (v, bytes) in vectors {
            let mut out = Vec::new();
            encode_varint(*v, &mut out);
            assert_eq!(&out[..], *bytes, "encode {v}");
            assert_eq!(
                decode_varint(bytes, "t").unwrap(),
                (*v, bytes.len()),
                "decode {v}"
            );
        }
    }

    #[test]
    fn varint_round_trips_across_boundaries() {
        let mut v: u64 = 0;
        let mut checked = 0;
        while checked < 4000 {
            for x in [v, v.saturating_add(1), v.saturating_sub(1)] {
                let mut out = Vec::new();
                encode_varint(x, &mut out);
                assert_eq!(decode_varint(&out, "t").unwrap(), (x, out.len()));
                checked += 1;
            }
            v = v.saturating_mul(3).saturating_add(7);
            if v == u64::MAX {
                break;
            }
        }
    }

    #[test]
    fn varint_errors() {
        assert_eq!(
            decode_varint(&[], "x"),
            Err(FrameError::Truncated { what: "x" })
        );
        assert_eq!(
            decode_varint(&[0xf0], "x"),
            Err(FrameError::Truncated { what: "x" })
        );
        assert_eq!(
            decode_varint(&[0xf0, 0x80, 0x80], "x"),
            Err(FrameError::Truncated { what: "x" })
        );
        // One more than u64::MAX, and an endless run of continuation bytes.
        assert_eq!(
            decode_varint(
                &[0xf0, 0xf1, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe, 0x0e],
                "x"
            ),
            Err(FrameError::VarintOverflow { what: "x" })
        );
        assert_eq!(
            decode_varint(&[0xff; 40], "x"),
            Err(FrameError::VarintOverflow { what: "x" })
        );
    }

    #[test]
    fn captured_hello_traffic_connection() {
        let Frame::HaproxyHello(kv) = decode_all(HELLO) else {
            panic!("not a HELLO")
        };
        let hello = HaproxyHello::from_kv(&kv).unwrap();
        assert_eq!(hello.supported_versions, vec!["2.0"]);
        assert_eq!(hello.max_frame_size, 16380);
        assert_eq!(hello.capabilities, vec!["pipelining", "async"]);
        assert!(!hello.healthcheck);
        let engine = hello.engine_id.as_deref().unwrap();
        assert_eq!(engine.len(), 36, "a UUID: {engine}");
        assert_eq!(hello.negotiate_frame_size(AGENT_MAX_FRAME_SIZE), 16380);
        assert_eq!(hello.negotiate_frame_size(1000), 1000);
        // Keys come in the order HAProxy writes them.
        let keys: Vec<&str> = kv.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "supported-versions",
                "max-frame-size",
                "capabilities",
                "engine-id"
            ]
        );
    }

    #[test]
    fn captured_hello_health_check() {
        let Frame::HaproxyHello(kv) = decode_all(HELLO_HC) else {
            panic!("not a HELLO")
        };
        let hello = HaproxyHello::from_kv(&kv).unwrap();
        assert!(hello.healthcheck);
        assert!(hello.capabilities.is_empty());
        assert_eq!(hello.engine_id, None);
        assert_eq!(kv.get("capabilities"), Some(&TypedData::String(vec![])));
        assert_eq!(kv.get("healthcheck"), Some(&TypedData::Bool(true)));
    }

    #[test]
    fn captured_notify_with_cert() {
        let Frame::Notify(n) = decode_all(NOTIFY_CERT) else {
            panic!("not a NOTIFY")
        };
        assert_eq!((n.stream_id, n.frame_id), (0, 1));
        assert_eq!(n.messages.len(), 1);
        assert_eq!(n.messages[0].name, "check-client");
        assert_eq!(n.messages[0].args.len(), 1);
        assert_eq!(
            n.find_arg(Some("check-client"), "cert"),
            Some(&TypedData::Binary(CLIENT_DER.to_vec()))
        );
    }

    #[test]
    fn captured_notify_without_cert() {
        let Frame::Notify(n) = decode_all(NOTIFY_NOCERT) else {
            panic!("not a NOTIFY")
        };
        // The second stream of the capture; frame ids restart at 1 per stream.
        assert_eq!((n.stream_id, n.frame_id), (2, 1));
        assert_eq!(n.find_arg(None, "cert"), Some(&TypedData::Null));
    }

    #[test]
    fn captured_disconnect() {
        let Frame::HaproxyDisconnect(kv) = decode_all(DISCONNECT) else {
            panic!("not a DISCONNECT")
        };
        let d = Disconnect::from_kv(&kv).unwrap();
        assert_eq!(d.status_code, 0);
        assert_eq!(d.message, "normal");
    }

    #[test]
    fn captured_frames_reencode_byte_for_byte() {
        for fx in [HELLO, HELLO_HC, NOTIFY_CERT, NOTIFY_NOCERT, DISCONNECT] {
            assert_eq!(enc(&decode_all(fx)), fx);
        }
    }

    #[test]
    fn agent_hello_matches_reference_bytes() {
        // The AGENT-HELLO from the reference capture, which HAProxy 2.6.12 accepted.
        let expected: Vec<u8> = [
            &[0, 0, 0, 0x40, 0x65, 0, 0, 0, 1, 0, 0][..],
            b"\x07version\x08\x032.0",
            b"\x0emax-frame-size\x03\xfc\xf0\x06",
            b"\x0ccapabilities\x08\x0apipelining",
        ]
        .concat();
        assert_eq!(enc(&Frame::agent_hello(16380)), expected);
        let Frame::AgentHello(kv) = decode_all(&expected) else {
            panic!()
        };
        let h = AgentHello::from_kv(&kv).unwrap();
        assert_eq!(h.version, "2.0");
        assert_eq!(h.max_frame_size, 16380);
        assert_eq!(h.capabilities, vec!["pipelining"]);
    }

    #[test]
    fn ack_matches_reference_bytes() {
        let allow = Frame::ack_set_var(0, 1, VarScope::Session, "allow", TypedData::Bool(true));
        let expected = b"\x00\x00\x00\x11\x67\x00\x00\x00\x01\x00\x01\x01\x03\x01\x05allow\x11";
        assert_eq!(enc(&allow), expected);
        let deny = Frame::ack_set_var(2, 1, VarScope::Session, "allow", TypedData::Bool(false));
        assert!(enc(&deny).ends_with(b"\x02\x01\x01\x03\x01\x05allow\x01"));
        assert_eq!(decode_all(&enc(&deny)), deny);
    }

    #[test]
    fn empty_ack_is_refused() {
        let ack = Frame::Ack(Ack {
            stream_id: 1,
            frame_id: 1,
            actions: vec![],
        });
        let mut out = vec![9];
        assert_eq!(ack.encode(MAX, &mut out), Err(FrameError::EmptyAck));
        assert_eq!(out, vec![9], "output untouched on error");
    }

    #[test]
    fn encode_respects_max_frame_size() {
        let big = Frame::Notify(Notify {
            stream_id: 1,
            frame_id: 1,
            messages: vec![Message {
                name: "m".into(),
                args: vec![("cert".into(), TypedData::Binary(vec![0; 300]))],
            }],
        });
        let mut out = Vec::new();
        assert!(matches!(
            big.encode(256, &mut out),
            Err(FrameError::FrameTooBig { max: 256, .. })
        ));
        assert!(out.is_empty());
        big.encode(400, &mut out).unwrap();
        assert!(matches!(
            decode(&out, 256),
            Err(FrameError::FrameTooBig { max: 256, .. })
        ));
    }

    #[test]
    fn agent_disconnect_round_trip() {
        let f = Frame::agent_disconnect(StatusCode::Invalid, "invalid frame: frame truncated");
        let Frame::AgentDisconnect(kv) = decode_all(&enc(&f)) else {
            panic!()
        };
        let d = Disconnect::from_kv(&kv).unwrap();
        assert_eq!(d.status_code, 4);
        assert_eq!(d.message, "invalid frame: frame truncated");
        assert_eq!(kv.get("status-code"), Some(&TypedData::Uint32(4)));
        // Long messages are cut on a char boundary.
        let long = "é".repeat(200);
        let Frame::AgentDisconnect(kv) = Frame::agent_disconnect(StatusCode::Io, &long) else {
            panic!()
        };
        assert!(kv.get("message").and_then(TypedData::as_str).unwrap().len() <= 160);
    }

    #[test]
    fn every_typed_data_round_trips() {
        let values = vec![
            TypedData::Null,
            TypedData::Bool(true),
            TypedData::Bool(false),
            TypedData::Int32(-1),
            TypedData::Int32(i32::MIN),
            TypedData::Int32(i32::MAX),
            TypedData::Uint32(u32::MAX),
            TypedData::Int64(i64::MIN),
            TypedData::Int64(-1),
            TypedData::Uint64(u64::MAX),
            TypedData::Ipv4(Ipv4Addr::new(127, 0, 0, 1)),
            TypedData::Ipv6(Ipv6Addr::LOCALHOST),
            TypedData::String(b"caf\xc3\xa9 \xff".to_vec()),
            TypedData::Binary(vec![0; 3000]),
        ];
        let notify = Frame::Notify(Notify {
            stream_id: 7,
            frame_id: 300,
            messages: vec![
                Message {
                    name: "check-client".into(),
                    args: values.iter().map(|v| (String::new(), v.clone())).collect(),
                },
                Message {
                    name: "empty".into(),
                    args: vec![],
                },
            ],
        });
        assert_eq!(decode_all(&enc(&notify)), notify);
        let ack = Frame::Ack(Ack {
            stream_id: u64::MAX,
            frame_id: 2288,
            actions: values
                .iter()
                .map(|v| Action::SetVar {
                    scope: VarScope::Transaction,
                    name: "x".into(),
                    value: v.clone(),
                })
                .chain([Action::UnsetVar {
                    scope: VarScope::Response,
                    name: "y".into(),
                }])
                .collect(),
        });
        assert_eq!(decode_all(&enc(&ack)), ack);
    }

    #[test]
    fn repeated_and_empty_argument_names_are_kept() {
        let n = Notify {
            stream_id: 1,
            frame_id: 1,
            messages: vec![Message {
                name: "m".into(),
                args: vec![
                    (String::new(), TypedData::Int64(1)),
                    (String::new(), TypedData::Int64(2)),
                    ("cert".into(), TypedData::Null),
                    ("cert".into(), TypedData::Binary(vec![1])),
                ],
            }],
        };
        let Frame::Notify(back) = decode_all(&enc(&Frame::Notify(n.clone()))) else {
            panic!()
        };
        assert_eq!(back, n);
        assert_eq!(back.find_arg(None, "cert"), Some(&TypedData::Null));
    }

    #[test]
    fn bool_flag_nibble_follows_haproxy() {
        // Only exactly 0x10 in the high nibble is true; 0x31 is false, as HAProxy reads it.
        let mut body = vec![1, 0, 0, 0, 1, 0, 0];
        body.extend_from_slice(b"\x0bhealthcheck\x31");
        let Frame::HaproxyHello(kv) = decode_body(&body).unwrap() else {
            panic!()
        };
        assert_eq!(kv.get("healthcheck"), Some(&TypedData::Bool(false)));
    }

    #[test]
    fn incremental_decode_waits_for_whole_frame() {
        let mut two = NOTIFY_CERT.to_vec();
        two.extend_from_slice(NOTIFY_NOCERT);
        for cut in 0..NOTIFY_CERT.len() {
            assert_eq!(decode(&two[..cut], MAX), Ok(None), "prefix of {cut} bytes");
        }
        let (first, used) = decode(&two, MAX).unwrap().unwrap();
        assert_eq!(used, NOTIFY_CERT.len());
        assert!(matches!(first, Frame::Notify(Notify { stream_id: 0, .. })));
        let (second, used2) = decode(&two[used..], MAX).unwrap().unwrap();
        assert_eq!(used2, NOTIFY_NOCERT.len());
        assert!(matches!(second, Frame::Notify(Notify { stream_id: 2, .. })));
    }

    #[test]
    fn truncated_frames_are_errors_not_panics() {
        // Shrinking the length prefix makes each fixture a complete but truncated frame.
        for fx in [HELLO, HELLO_HC, NOTIFY_CERT, NOTIFY_NOCERT, DISCONNECT] {
            let body = &fx[LENGTH_PREFIX..];
            for cut in 0..body.len() {
                let mut f = (cut as u32).to_be_bytes().to_vec();
                f.extend_from_slice(&body[..cut]);
                // Every cut either fails or, when it falls between KV items or messages,
                // decodes to fewer items: never a panic, never reading past the frame.
                if let Ok(Some((_, used))) = decode(&f, MAX) {
                    assert_eq!(used, f.len());
                }
            }
        }
        assert_eq!(
            decode(&[0, 0, 0, 0], MAX),
            Err(FrameError::Truncated { what: "frame type" })
        );
        assert_eq!(
            decode(&[0, 0, 0, 3, 3, 0, 0], MAX),
            Err(FrameError::Truncated {
                what: "frame flags"
            })
        );
        // NOTIFY whose only argument claims 433 bytes of BINARY but has 2.
        let mut f = vec![3, 0, 0, 0, 1, 0, 1, 1, b'm', 1, 4];
        f.extend_from_slice(b"cert\x09\xf1\x0c\x30\x82");
        assert_eq!(
            decode_body(&f),
            Err(FrameError::Truncated {
                what: "argument value"
            })
        );
    }

    #[test]
    fn garbage_gives_typed_errors() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (
                vec![200, 0, 0, 0, 1, 0, 0],
                FrameError::UnknownFrameType(200),
            ),
            (
                vec![0, 0, 0, 0, 1, 0, 0],
                FrameError::Fragmented {
                    frame_type: FrameType::Unset,
                },
            ),
            (
                vec![3, 0, 0, 0, 0, 0, 1],
                FrameError::Fragmented {
                    frame_type: FrameType::Notify,
                },
            ),
            (
                vec![1, 0, 0, 0, 1, 0, 1],
                FrameError::NonZeroIds {
                    frame_type: FrameType::HaproxyHello,
                },
            ),
            (
                vec![1, 0, 0, 0, 1, 0, 0, 1, b'k', 0x0a],
                FrameError::UnknownDataType(10),
            ),
            (
                vec![1, 0, 0, 0, 1, 0, 0, 1, 0xff, 0x08, 0],
                FrameError::InvalidUtf8 {
                    what: "KV-list key",
                },
            ),
            (
                vec![
                    1, 0, 0, 0, 1, 0, 0, 1, b'k', 0x03, 0xf0, 0xf1, 0xfe, 0xfe, 0x7e,
                ],
                FrameError::IntegerOutOfRange {
                    what: "KV-list value",
                },
            ),
            (
                vec![103, 0, 0, 0, 1, 0, 1, 9, 3],
                FrameError::UnknownActionType(9),
            ),
            (
                vec![103, 0, 0, 0, 1, 0, 1, 1, 2],
                FrameError::BadActionArgs {
                    action_type: 1,
                    nb_args: 2,
                },
            ),
            (
                vec![103, 0, 0, 0, 1, 0, 1, 2, 2, 7, 0],
                FrameError::UnknownVarScope(7),
            ),
            (
                vec![
                    3, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                ],
                FrameError::VarintOverflow { what: "stream-id" },
            ),
        ];
        for (body, want) in cases {
            assert_eq!(decode_body(&body), Err(want.clone()), "{body:02x?}");
            // And through the length-prefixed entry point.
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&body);
            assert_eq!(decode(&f, MAX), Err(want));
        }
        assert_eq!(
            decode(&[0, 1, 0, 0], MAX),
            Err(FrameError::FrameTooBig {
                len: 65536,
                max: MAX
            })
        );
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        // A cheap in-tree fuzz pass; the real one is fuzz/fuzz_targets/spop_frame.rs.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let fixtures = [HELLO, HELLO_HC, NOTIFY_CERT, NOTIFY_NOCERT, DISCONNECT];
        for i in 0..20_000 {
            let mut buf = fixtures[i % fixtures.len()].to_vec();
            let flips = 1 + (next() % 4) as usize;
            for _ in 0..flips {
                let pos = (next() as usize) % buf.len();
                buf[pos] = next() as u8;
            }
            if let Ok(Some((frame, _))) = decode(&buf, MAX) {
                let mut out = Vec::new();
                if frame.encode(usize::MAX, &mut out).is_ok() {
                    assert_eq!(decode(&out, usize::MAX).unwrap().unwrap().0, frame);
                }
            }
        }
    }

    #[test]
    fn hello_validation_maps_to_status_codes() {
        let base = |skip: &str, extra: Vec<(String, TypedData)>| {
            let mut kv: Vec<(String, TypedData)> = vec![
                (
                    "supported-versions".into(),
                    TypedData::String(b"2.0".to_vec()),
                ),
                ("max-frame-size".into(), TypedData::Uint32(16380)),
                (
                    "capabilities".into(),
                    TypedData::String(b"pipelining".to_vec()),
                ),
            ];
            kv.retain(|(k, _)| k != skip);
            kv.extend(extra);
            HaproxyHello::from_kv(&KvList(kv))
        };
        assert!(base("", vec![]).is_ok());
        let code = |r: Result<HaproxyHello, FrameError>| r.unwrap_err().status_code().code();
        assert_eq!(code(base("supported-versions", vec![])), 5);
        assert_eq!(code(base("max-frame-size", vec![])), 6);
        assert_eq!(code(base("capabilities", vec![])), 7);
        let v = |s: &str| {
            vec![(
                "supported-versions".to_string(),
                TypedData::String(s.as_bytes().to_vec()),
            )]
        };
        assert_eq!(code(base("supported-versions", v("1.0"))), 8);
        assert!(base("supported-versions", v("1.0, 2.0")).is_ok());
        let small = vec![("max-frame-size".to_string(), TypedData::Int64(100))];
        assert_eq!(code(base("max-frame-size", small)), 9);
        let wrong = vec![("max-frame-size".to_string(), TypedData::Null)];
        assert_eq!(code(base("max-frame-size", wrong)), 4);
    }

    const NOTIFY_L7_CONN: &[u8] = include_bytes!("../../fixtures/spop/notify-l7-connection.bin");
    const NOTIFY_REQUEST: &[u8] = include_bytes!("../../fixtures/spop/notify-request.bin");

    /// HAProxy 2.6's per-request NOTIFY (`check-request` on on-frontend-http-request) for
    /// `POST /api/x?q=1` with `X-Test-Debug: a` and `x-test-debug: b`, captured by
    /// scripts/capture-spop after its agent answered the connection with allow + l7 + src.
    #[test]
    fn captured_notify_request() {
        let Frame::Notify(n) = decode_all(NOTIFY_REQUEST) else {
            panic!("not a NOTIFY");
        };
        assert_eq!(enc(&Frame::Notify(n.clone())), NOTIFY_REQUEST);
        assert_eq!(n.messages.len(), 1);
        let m = &n.messages[0];
        assert_eq!(m.name, "check-request");
        let names: Vec<&str> = m.args.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["src", "method", "path", "headers"]);
        assert_eq!(
            m.arg("src").and_then(TypedData::as_str),
            Some(
                "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client"
            )
        );
        assert_eq!(m.arg("method").and_then(TypedData::as_str), Some("POST"));
        // `path` has no query string.
        assert_eq!(m.arg("path").and_then(TypedData::as_str), Some("/api/x"));
        let Some(TypedData::Binary(h)) = m.arg("headers") else {
            panic!("headers is not BINARY: {:?}", m.arg("headers"));
        };
        let fields = decode_hdrs_bin(h).unwrap();
        let text: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        let debug: Vec<&(String, String)> = text
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("x-test-debug"))
            .collect();
        assert_eq!(debug.len(), 2, "{text:?}");
        assert_eq!((debug[0].1.as_str(), debug[1].1.as_str()), ("a", "b"));
        assert!(
            text.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")),
            "{text:?}"
        );
    }

    /// The http listener's per-connection NOTIFY is the same `check-client` message as tcp's.
    #[test]
    fn captured_l7_connection_notify_is_check_client() {
        let Frame::Notify(n) = decode_all(NOTIFY_L7_CONN) else {
            panic!("not a NOTIFY");
        };
        assert_eq!(
            n.find_arg(Some("check-client"), "cert"),
            Some(&TypedData::Binary(CLIENT_DER.to_vec()))
        );
    }

    #[test]
    fn hdrs_bin_edge_cases() {
        let mut ok = Vec::new();
        for part in [&b"a"[..], b"1", b"", b""] {
            encode_varint(part.len() as u64, &mut ok);
            ok.extend_from_slice(part);
        }
        assert_eq!(decode_hdrs_bin(&ok).unwrap(), vec![(&b"a"[..], &b"1"[..])]);
        // Without its end marker, cut inside a field, or a length past the end: errors.
        assert!(decode_hdrs_bin(&ok[..4]).is_err());
        assert!(decode_hdrs_bin(&ok[..1]).is_err());
        assert!(decode_hdrs_bin(&[5, b'a']).is_err());
        assert!(
            decode_hdrs_bin(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err()
        );
        assert_eq!(decode_hdrs_bin(&[0, 0]).unwrap(), vec![]);
    }
}
