from .lifeline import die_with_parent, tolerate_fd_limit

die_with_parent()
tolerate_fd_limit()

from .server import main  # noqa: E402  (after the safeguards, which must come first)

main()
