//! Minimal HTTP/1.1: request parsing (Content-Length bodies, case-insensitive headers,
//! keep-alive, `Expect: 100-continue`), query-string decoding and response writing.

use std::io::{self, BufRead, Read, Write};

use serde_json::{Value, json};

/// Largest request head (request line + headers) we accept.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines we accept.
pub const MAX_HEADERS: usize = 128;
/// Largest request body we read (the /a2a limit of 16 MiB is checked by its handler).
pub const MAX_BODY_BYTES: usize = 17 * 1024 * 1024;
/// Bodies above the cap but at most this big are read and discarded before the 413,
/// so the client sees the answer instead of a reset.
const DRAIN_LIMIT: u64 = 256 * 1024 * 1024;

/// One parsed request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub http11: bool,
    /// Header names lower-cased, values trimmed, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer_ip: String,
}

impl Request {
    /// First value of header `name` (give it lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Does the client want the connection closed after this exchange?
    pub fn wants_close(&self) -> bool {
        let conn = self
            .header("connection")
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        let has = |t: &str| conn.split(',').any(|x| x.trim() == t);
        if self.http11 {
            has("close")
        } else {
            !has("keep-alive")
        }
    }

    /// Decoded query pairs in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        parse_query(&self.query)
    }

    /// First decoded value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// Clean end of stream before a new request started.
    Closed,
    /// Transport error or EOF in the middle of a request: just close.
    Io,
    /// Malformed request: answer `status` with `{"error": message}`, then close.
    Bad { status: u16, message: &'static str },
    /// Declared body above [`MAX_BODY_BYTES`]: answer 413, then close.
    TooLarge { path: String, len: u64 },
}

/// Read one line (through `\n`) into `buf`, charging it against `budget`.
/// Returns Ok(false) on EOF before any byte.
fn read_line<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    budget: &mut usize,
) -> Result<bool, ReadError> {
    buf.clear();
    let limit = (*budget as u64).saturating_add(1);
    let n = r
        .by_ref()
        .take(limit)
        .read_until(b'\n', buf)
        .map_err(|_| ReadError::Io)?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() != Some(&b'\n') {
        if n as u64 >= limit {
            return Err(ReadError::Bad {
                status: 431,
                message: "request header fields too large",
            });
        }
        return Err(ReadError::Io);
    }
    *budget = budget.saturating_sub(n);
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(true)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// Read one request. `continue_writer` receives `100 Continue` when the client asks.
pub fn read_request<R: BufRead, W: Write>(
    r: &mut R,
    continue_writer: &mut W,
) -> Result<Request, ReadError> {
    const BAD_LINE: ReadError = ReadError::Bad {
        status: 400,
        message: "malformed request line",
    };
    let mut budget = MAX_HEAD_BYTES;
    let mut line = Vec::with_capacity(256);
    // Tolerate empty lines before the request line (RFC 9112 §2.2).
    let mut first = true;
    loop {
        if !read_line(r, &mut line, &mut budget)? {
            return Err(if first {
                ReadError::Closed
            } else {
                ReadError::Io
            });
        }
        first = false;
        if !line.is_empty() {
            break;
        }
    }
    let request_line = std::str::from_utf8(&line).map_err(|_| BAD_LINE)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD_LINE);
    };
    if !is_token(method) || !target.starts_with('/') {
        return Err(BAD_LINE);
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(BAD_LINE),
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.to_string(), String::new()),
    };
    let mut req = Request {
        method: method.to_string(),
        path,
        query,
        http11,
        ..Request::default()
    };
    loop {
        if !read_line(r, &mut line, &mut budget)? {
            return Err(ReadError::Io);
        }
        if line.is_empty() {
            break;
        }
        if req.headers.len() >= MAX_HEADERS {
            return Err(ReadError::Bad {
                status: 431,
                message: "too many header fields",
            });
        }
        let text = std::str::from_utf8(&line).map_err(|_| ReadError::Bad {
            status: 400,
            message: "malformed header",
        })?;
        let Some((name, value)) = text.split_once(':') else {
            return Err(ReadError::Bad {
                status: 400,
                message: "malformed header",
            });
        };
        if !is_token(name) {
            return Err(ReadError::Bad {
                status: 400,
                message: "malformed header",
            });
        }
        req.headers
            .push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    if req.header("transfer-encoding").is_some() {
        return Err(ReadError::Bad {
            status: 411,
            message: "chunked request bodies are not supported; send Content-Length",
        });
    }
    let mut len: Option<u64> = None;
    for (k, v) in &req.headers {
        if k == "content-length" {
            let n: u64 = v.parse().map_err(|_| ReadError::Bad {
                status: 400,
                message: "invalid Content-Length",
            })?;
            if len.is_some_and(|old| old != n) {
                return Err(ReadError::Bad {
                    status: 400,
                    message: "conflicting Content-Length",
                });
            }
            len = Some(n);
        }
    }
    let len = len.unwrap_or(0);
    let expects_continue = req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if len > MAX_BODY_BYTES as u64 {
        if !expects_continue && len <= DRAIN_LIMIT {
            let _ = io::copy(&mut r.by_ref().take(len), &mut io::sink());
        }
        return Err(ReadError::TooLarge {
            path: req.path,
            len,
        });
    }
    if len > 0 {
        if expects_continue && req.http11 {
            continue_writer
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .and_then(|()| continue_writer.flush())
                .map_err(|_| ReadError::Io)?;
        }
        let mut body = vec![0u8; len as usize];
        r.read_exact(&mut body).map_err(|_| ReadError::Io)?;
        req.body = body;
    }
    Ok(req)
}

/// Decode `%XX` escapes (and `+` as space when `plus` is set); invalid escapes stay literal.
pub fn percent_decode(s: &str, plus: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Split and decode an `application/x-www-form-urlencoded` query string.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k, true), percent_decode(v, true)),
            None => (percent_decode(p, true), String::new()),
        })
        .collect()
}

/// One response. The body is always sent with `Content-Type: application/json`,
/// unless `stream` is set: then the connection becomes an event stream (§2.17).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub stream: Option<crate::events::Subscription>,
}

impl Response {
    /// `status` with `value` serialised as the body.
    pub fn json(status: u16, value: &Value) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: serde_json::to_vec(value).unwrap_or_default(),
            stream: None,
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, &json!({ "error": message }))
    }

    /// `status` with an empty body.
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            stream: None,
        }
    }

    /// Add a header.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

/// Reason phrase for the status line.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Serialise `resp` (one `write_all`).
pub fn write_response<W: Write>(w: &mut W, resp: &Response, keep_alive: bool) -> io::Result<()> {
    let mut out = Vec::with_capacity(160 + resp.body.len());
    // A handler may set its own type (file downloads); JSON otherwise.
    let typed = resp
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n{}Content-Length: {}\r\nConnection: {}\r\n",
        resp.status,
        reason(resp.status),
        if typed {
            ""
        } else {
            "Content-Type: application/json\r\n"
        },
        resp.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    for (k, v) in &resp.headers {
        let clean = |s: &str| s.replace(['\r', '\n'], " ");
        let _ = write!(out, "{}: {}\r\n", clean(k), clean(v));
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&resp.body);
    w.write_all(&out)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor};

    fn parse(raw: &[u8]) -> Result<Request, ReadError> {
        let mut r = BufReader::new(Cursor::new(raw.to_vec()));
        read_request(&mut r, &mut Vec::new())
    }

    #[test]
    fn parses_simple_post() {
        let req = parse(
            b"POST /workspaces/x/a2a?a=1&b=x%20y+z HTTP/1.1\r\nHost: h\r\nCONTENT-length: 2\r\nX-Thing:  v \r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/workspaces/x/a2a");
        assert_eq!(req.query_param("b").as_deref(), Some("x y z"));
        assert_eq!(req.header("x-thing"), Some("v"));
        assert_eq!(req.body, b"{}");
        assert!(!req.wants_close());
    }

    #[test]
    fn pipelined_keep_alive() {
        let raw = b"GET /health HTTP/1.1\r\nHost: h\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabcGET";
        let mut r = BufReader::new(Cursor::new(raw.to_vec()));
        let a = read_request(&mut r, &mut Vec::new()).unwrap();
        assert_eq!(a.path, "/health");
        let b = read_request(&mut r, &mut Vec::new()).unwrap();
        assert_eq!(b.body, b"abc");
        assert!(b.wants_close());
        assert!(matches!(
            read_request(&mut r, &mut Vec::new()),
            Err(ReadError::Io)
        ));
        assert!(matches!(
            read_request(&mut r, &mut Vec::new()),
            Err(ReadError::Closed)
        ));
    }

    #[test]
    fn http10_defaults_to_close() {
        let req = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(req.wants_close());
    }

    #[test]
    fn rejects_bad_request_lines() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /x HTTP/2.0\r\n\r\n",
            b"GET x HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1 extra\r\n\r\n",
            b"GET /x HTTP/1.1\r\nno-colon\r\n\r\n",
            b"GET /x HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(ReadError::Bad { status: 400, .. })),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(matches!(
            parse(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ReadError::Bad { status: 411, .. })
        ));
    }

    #[test]
    fn rejects_huge_header() {
        let mut raw = b"GET /x HTTP/1.1\r\nX-Big: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        raw.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(
            parse(&raw),
            Err(ReadError::Bad { status: 431, .. })
        ));
        // No newline at all: still bounded.
        let raw = vec![b'G'; MAX_HEAD_BYTES * 2];
        assert!(matches!(
            parse(&raw),
            Err(ReadError::Bad { status: 431, .. })
        ));
    }

    #[test]
    fn too_large_body_is_reported() {
        let raw = format!(
            "POST /workspaces/x/a2a HTTP/1.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        match parse(raw.as_bytes()) {
            Err(ReadError::TooLarge { path, len }) => {
                assert_eq!(path, "/workspaces/x/a2a");
                assert_eq!(len, MAX_BODY_BYTES as u64 + 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_body_is_io() {
        assert!(matches!(
            parse(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            Err(ReadError::Io)
        ));
    }

    #[test]
    fn sends_100_continue() {
        let raw = b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi";
        let mut r = BufReader::new(Cursor::new(raw.to_vec()));
        let mut w = Vec::new();
        let req = read_request(&mut r, &mut w).unwrap();
        assert_eq!(req.body, b"hi");
        assert_eq!(w, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Cb%", true), "a,b%");
        assert_eq!(percent_decode("%zz+", false), "%zz+");
        assert_eq!(
            parse_query("type=a2a_receive&include=peer_info&x"),
            vec![
                ("type".into(), "a2a_receive".into()),
                ("include".into(), "peer_info".into()),
                ("x".into(), String::new())
            ]
        );
    }

    #[test]
    fn writes_response() {
        let mut out = Vec::new();
        let resp = Response::error(404, "not found").with_header("X-A", "1");
        write_response(&mut out, &resp, true).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(s.contains("Content-Length: 21\r\n"));
        assert!(s.contains("X-A: 1\r\n"));
        assert!(s.ends_with("\r\n\r\n{\"error\":\"not found\"}"));
    }
}
