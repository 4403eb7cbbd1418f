//! Every way a component connects, against real nats-servers: TLS with client certificates
//! (generated here), user and password, several server URLs. (nkeys: the permission tests
//! connect every identity with one.)

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rct_streams::testkit::{Server, Setup};
use rct_streams::{Config, Connection, provision};

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
fn certificates(dir: &Path, name: &str) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issue = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose, file: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
    };
    std::fs::write(dir.join(format!("{name}ca.pem")), ca_cert.pem()).unwrap();
    issue(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        &format!("{name}server"),
    );
    issue(
        vec!["rct-client".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        &format!("{name}client"),
    );
}

#[tokio::test]
async fn tls_with_client_certificates_verified_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certificates(d, "");
    certificates(d, "other-");
    let server = Server::start_with(Setup {
        extra: format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
            d.join("server.pem"),
            d.join("server-key.pem"),
            d.join("ca.pem"),
        ),
        ..Setup::default()
    })
    .await;
    let tls = Connection {
        tls_ca: Some(d.join("ca.pem")),
        tls_cert: Some(d.join("client.pem")),
        tls_key: Some(d.join("client-key.pem")),
        ..Connection::to([server.url()])
    };
    let client = tls.connect("tls test", false).await.unwrap();
    let report = provision(&tls.jetstream(client), &Config::default())
        .await
        .unwrap();
    assert!(!report.items.is_empty());

    // No client certificate: the server refuses.
    let anonymous = Connection {
        tls_cert: None,
        tls_key: None,
        ..tls.clone()
    };
    assert!(anonymous.connect("no cert", false).await.is_err());
    // A certificate from another CA: refused.
    let stranger = Connection {
        tls_cert: Some(d.join("other-client.pem")),
        tls_key: Some(d.join("other-client-key.pem")),
        ..tls.clone()
    };
    assert!(stranger.connect("other CA", false).await.is_err());
    // The client does not trust a server its CA did not sign.
    let distrustful = Connection {
        tls_ca: Some(d.join("other-ca.pem")),
        ..tls.clone()
    };
    assert!(distrustful.connect("wrong CA", false).await.is_err());
    // No TLS at all: refused.
    assert!(
        Connection::to([server.url()])
            .connect("plain", false)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn user_and_password_and_a_clear_error_when_wrong() {
    let server = Server::start_with(Setup {
        extra: "authorization {\n  users: [ { user: admission, password: \"s3cret\" } ]\n}\n"
            .into(),
        ..Setup::default()
    })
    .await;
    let right = Connection {
        user: Some("admission".into()),
        password: Some("s3cret".into()),
        ..Connection::to([server.url()])
    };
    let client = right.connect("user test", false).await.unwrap();
    provision(&right.jetstream(client), &Config::default())
        .await
        .unwrap();
    let wrong = Connection {
        password: Some("guess".into()),
        ..right.clone()
    };
    let error = wrong.connect("wrong", false).await.unwrap_err().to_string();
    assert!(
        error.contains(&server.url()) && error.to_lowercase().contains("author"),
        "{error}"
    );
}

#[tokio::test]
async fn several_servers_fail_over_to_one_that_answers() {
    let server = Server::start().await;
    // Nothing listens on port 1, and no test's server can be given it (they take ephemeral
    // ports): a free port picked here could be taken by another test's server meanwhile.
    let dead = "nats://127.0.0.1:1".to_owned();
    // Both orders: a connection that used only the first, or only the last, server fails
    // one of them.
    for servers in [[dead.clone(), server.url()], [server.url(), dead.clone()]] {
        for _ in 0..3 {
            let connection = Connection::to(servers.clone());
            let client = connection.connect("failover", false).await.unwrap();
            provision(&connection.jetstream(client), &Config::default())
                .await
                .unwrap();
        }
    }
}
