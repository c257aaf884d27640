from .lifeline import close_stray_stdio, die_with_parent, tolerate_fd_limit

close_stray_stdio()
die_with_parent()
tolerate_fd_limit()

from .server import main  # noqa: E402  (after the safeguards, which must come first)

main()
