"""Weight files from anywhere, read without torch and running nothing from them (`files`,
`torch_pickle`); mapping their tensors onto the networks is `patchdiff.nn.torch_io`'s job."""
