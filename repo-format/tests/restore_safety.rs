//! Nothing a snapshot holds can make a restore write outside its target.

mod common;

use std::fs;

use prost::Message;
use repo_format::repofile::tree::{ChunkRef, Node, NodeKind, Tree};
use repo_format::{BlobKind, Error, Id, Writer};

fn tree_with(nodes: Vec<Node>) -> (tempfile::TempDir, repo_format::Repository, Id) {
    let tmp = tempfile::tempdir().unwrap();
    let (_b, mut repo) = common::local_repo(&tmp.path().join("repo"));
    let mut w = Writer::new(&repo, 1);
    let mut nodes = nodes;
    for n in nodes.iter_mut().filter(|n| n.kind == NodeKind::Hardlink as i32 || n.kind == NodeKind::File as i32) {
        let id = w.add(BlobKind::Data, b"payload".to_vec()).unwrap();
        n.content = vec![ChunkRef { id: id.0.to_vec(), offset: 0, length: 7 }];
        n.size = 7;
        n.mode = 0o644;
    }
    let root = w.add(BlobKind::Tree, Tree { version: 1, nodes }.encode_to_vec()).unwrap();
    let (idx, _) = w.finish().unwrap();
    let (id, f) = idx.unwrap();
    repo.add_index(id, &f);
    (tmp, repo, root)
}

fn node(name: &str, kind: NodeKind, link: &str) -> Node {
    Node {
        name: name.as_bytes().to_vec(),
        kind: kind as i32,
        link_target: link.as_bytes().to_vec(),
        mode: 0o755,
        ..Default::default()
    }
}

#[test]
fn dot_dot_and_slashes_in_names_are_refused() {
    for bad in ["..", ".", "a/b", "/etc", ""] {
        let (tmp, repo, root) = tree_with(vec![node(bad, NodeKind::File, "")]);
        let target = tmp.path().join("target");
        let e = repo_format::fs::restore(&repo, &root, &target).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{bad:?}: {e}");
        assert!(!tmp.path().join("payload").exists());
    }
}

#[test]
fn hard_link_through_a_restored_symlink_does_not_escape() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    fs::write(&secret, b"outside").unwrap();
    // "a" is a symlink to the outside folder; "b" claims to be a hard link to "a/secret".
    let (tmp, repo, root) = tree_with(vec![
        node("a", NodeKind::Symlink, outside.path().to_str().unwrap()),
        node("b", NodeKind::Hardlink, "a/secret"),
    ]);
    let target = tmp.path().join("target");
    repo_format::fs::restore(&repo, &root, &target).unwrap();
    let b = target.join("b");
    assert_eq!(fs::read(&b).unwrap(), b"payload", "written from its own content");
    use std::os::unix::fs::MetadataExt;
    assert_ne!(fs::metadata(&b).unwrap().ino(), fs::metadata(&secret).unwrap().ino());
    assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
}

#[test]
fn a_directory_cannot_be_restored_through_a_symlink_of_the_same_name() {
    let outside = tempfile::tempdir().unwrap();
    // Build: root = [symlink "d" -> outside, dir "d" containing "evil"].
    let tmp = tempfile::tempdir().unwrap();
    let (_b, mut repo) = common::local_repo(&tmp.path().join("repo"));
    let mut w = Writer::new(&repo, 1);
    let data = w.add(BlobKind::Data, b"payload".to_vec()).unwrap();
    let mut evil = node("evil", NodeKind::File, "");
    evil.content = vec![ChunkRef { id: data.0.to_vec(), offset: 0, length: 7 }];
    let subtree = w.add(BlobKind::Tree, Tree { version: 1, nodes: vec![evil] }.encode_to_vec()).unwrap();
    let mut d = node("d", NodeKind::Dir, "");
    d.subtree = subtree.0.to_vec();
    let root = w
        .add(
            BlobKind::Tree,
            Tree { version: 1, nodes: vec![node("d", NodeKind::Symlink, outside.path().to_str().unwrap()), d] }
                .encode_to_vec(),
        )
        .unwrap();
    let (idx, _) = w.finish().unwrap();
    let (id, f) = idx.unwrap();
    repo.add_index(id, &f);
    assert!(repo_format::fs::restore(&repo, &root, &tmp.path().join("target")).is_err());
    assert!(!outside.path().join("evil").exists(), "nothing written through the symlink");
}
