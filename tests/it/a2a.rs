//! Every A2A body we send is a valid A2A v0.3.0 `message/send` request
//! (`support/a2a_schema.rs` checks it against the published schema): connect replies,
//! error replies and `molecule send`, as the emulator received them. A peer reply is
//! threaded by the inbound `contextId`.

use serde_json::json;

use crate::support::a2a_schema::assert_valid;
use crate::support::*;

#[test]
fn replies_and_error_replies_validate_and_keep_the_context() {
    let Connected { emu, a, b, c, .. } = Test::new()
        .exec("x=$(cat); if [ \"$x\" = fail ]; then exit 3; fi; echo \"ok $x\"")
        .args(&["--max-attempts", "1"])
        .connect();
    emu.enqueue(
        &a.id,
        json!({"from": b.id, "text": "hello", "context_id": "ctx-hello"}),
    );
    emu.enqueue(
        &a.id,
        json!({"from": b.id, "text": "fail", "context_id": "ctx-fail"}),
    );
    emu.say(&a.id, Some(&b.id), "no context");
    let got = wait_received(&emu, &b.id, 3, &c);
    for m in &got {
        assert_valid(&m["body"]);
    }
    let by_text = |t: &str| {
        got.iter()
            .find(|m| m["text"].as_str().unwrap().contains(t))
            .unwrap_or_else(|| panic!("no reply containing {t:?}: {got:?}"))
    };
    let hello = &by_text("ok hello")["body"]["params"]["message"];
    assert_eq!(hello["contextId"], "ctx-hello");
    assert_eq!(hello["kind"], "message");
    let error = &by_text("could not handle")["body"]["params"]["message"];
    assert_eq!(error["contextId"], "ctx-fail");
    assert_eq!(error["metadata"]["molecule_error"], true);
    let plain = &by_text("ok no context")["body"]["params"]["message"];
    assert!(plain.get("contextId").is_none(), "{plain}");
}

#[test]
fn send_body_validates() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let token = dir.path().join("token");
    write_secret(&token, &a.token);
    let out = Run::new(&["send", &b.id, "are you there?", "--api-url", &emu.url])
        .args(&["--workspace", &a.id, "--token-file"])
        .arg(&token)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .out();
    assert_eq!(out.code, 0, "{out:?}");
    let got = emu.received(&b.id);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_valid(&got[0]["body"]);
}

#[test]
fn reply_with_file_and_data_parts_validates() {
    let inbound_row: molecule::ActivityRow = serde_json::from_value(json!({
        "id": "33333333-3333-4333-8333-333333333333",
        "source_id": "22222222-2222-4222-8222-222222222222",
        "method": "message/send",
        "request_body": {"jsonrpc":"2.0","id":"1","method":"message/send","params":{"message":{
            "kind":"message","role":"user","messageId":"m-1","contextId":"c-1",
            "parts":[{"kind":"text","text":"hi"}]}}}
    }))
    .unwrap();
    let inbound = molecule::classify(&inbound_row, "11111111-1111-4111-8111-111111111111").unwrap();
    let parts = [
        json!({"kind":"file","file":{"uri":"https://x/y.pdf","name":"y.pdf","mimeType":"application/pdf"}}),
        json!({"kind":"data","data":{"score":1}}),
    ];
    for text in ["answer", ""] {
        let body = molecule::reply_envelope("mid", text, &parts, &inbound);
        assert_valid(&body);
        assert_eq!(body["params"]["message"]["contextId"], "c-1");
    }
}

#[test]
fn an_exec_reply_with_a_malformed_part_fails_instead_of_going_out() {
    let cmd = r#"x=$(cat); case "$x" in *'"text":"bad"'*) echo '{"text":"t","parts":[{"kind":"data","data":"no"}]}';; *) echo '{"text":"ok","parts":[{"kind":"file","file":{"uri":"https://files.test/a.txt","name":"a.txt"}}]}';; esac"#;
    let Connected { emu, a, b, c, .. } = Test::new()
        .exec(cmd)
        .args(&["--backend-opt", "format=json", "--max-attempts", "1"])
        .connect();
    emu.say(&a.id, Some(&b.id), "bad");
    emu.say(&a.id, Some(&b.id), "good");
    let got = wait_received(&emu, &b.id, 2, &c);
    for m in &got {
        assert_valid(&m["body"]);
    }
    assert_eq!(
        texts(&got),
        [
            "Sorry, the agent could not handle this message (bad output: json reply: part 1: a data part has no \"data\" object).",
            "ok"
        ]
    );
    let parts = &got[1]["body"]["params"]["message"]["parts"];
    assert_eq!(parts[1]["file"]["name"], "a.txt", "{parts}");
}
