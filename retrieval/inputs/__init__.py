"""Reading untrusted files and corpora: the one image decoder and its cost bounds (`images`,
`imagecost`), caption tables (`captions`) and the bundled demo corpus (`demo`)."""
