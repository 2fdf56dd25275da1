"""Stage one: the frozen backbone over every view of every image, its tokens written to a token store."""
